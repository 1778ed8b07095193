"""The study itself: the sweep over student depths and variants, and the report that turns it into tables and plots.

Kept import-free so that `import distil_codegpt.experiment.report` does not pull in torch or the sweep's models.
"""

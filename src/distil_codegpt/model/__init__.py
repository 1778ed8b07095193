"""Model shapes (presets.py) and student initialisation from a teacher (student.py)."""

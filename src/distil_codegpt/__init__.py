"""distil-codegpt: distil GPT-2 code-completion models into small, fast students."""

__version__ = "0.1.0"

"""distil-codegpt: distil decoder-only code models (GPT-2, Llama, Qwen2, GPT-NeoX) into small, fast students."""

__version__ = "0.1.0"

"""A readable GPT whose hot ops run on Triton kernels (or PyTorch, on CPU/MPS)."""
from .config import PRESETS, GPTConfig, preset_config
from .model import GPT, create_model

__all__ = ["GPT", "GPTConfig", "PRESETS", "create_model", "preset_config"]

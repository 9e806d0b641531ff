"""A readable GPT whose hot ops run on Triton kernels (or PyTorch, on CPU/MPS)."""
from .checkpoint import load_model
from .hf import export_hf, load_hf
from .config import PRESETS, GPTConfig, preset_config
from .model import GPT, create_model
from .ops import KERNEL_MODES
from .quantize import quantize_int8

__all__ = ["GPT", "GPTConfig", "KERNEL_MODES", "PRESETS", "create_model", "export_hf", "load_hf", "load_model",
           "preset_config", "quantize_int8"]

"""Adapters from elsewhere: the reference releases (LLaMA-Adapter V1 and V2 .pth, LaVIN checkpoints),
PEFT AdaptionPrompt and LoRA folders, and export to PEFT. `load_adapter` / `save_adapter` here
wrap methods.io's own-format functions with format detection (see docs/checkpoints.md)."""

from .convert import base_of, convert
from .dispatch import FORMATS, SAVE_FORMATS, detect_format, import_adapter, load_adapter, save_adapter
from .pth import read_pth

__all__ = ["FORMATS", "SAVE_FORMATS", "base_of", "convert", "detect_format", "import_adapter", "load_adapter",
           "read_pth", "save_adapter"]

"""The LLaMA-family model, its loaders and tokenizer."""

from .config import ModelConfig, RopeScaling
from .llama import KVCache, LlamaLM
from .load import build_model, load_folder, load_pretrained
from .tokenizer import Tokenizer

__all__ = ["KVCache", "LlamaLM", "ModelConfig", "RopeScaling", "Tokenizer", "build_model", "load_folder",
           "load_pretrained"]

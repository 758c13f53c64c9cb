"""llama-adapter: LLaMA-Adapter V1/V2 and LaVIN on a frozen LLaMA-family model."""

from .model import KVCache, LlamaLM, ModelConfig, Tokenizer, build_model, load_pretrained

__version__ = "0.1.0"
__all__ = ["KVCache", "LlamaLM", "ModelConfig", "Tokenizer", "build_model", "load_pretrained"]

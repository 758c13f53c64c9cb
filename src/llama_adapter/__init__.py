"""llama-adapter: LLaMA-Adapter V1/V2 and LaVIN on a frozen LLaMA-family model."""

from .generate import Sampling, generate, stream
from .methods import (
    AdapterV1Config,
    AdapterV2Config,
    LavinConfig,
    attach,
    count_trainable,
    fold,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from .model import KVCache, LlamaLM, ModelConfig, Tokenizer, build_model, load_pretrained
from .model.fastpath import disable_compiled_decode, enable_compiled_decode

__version__ = "0.1.0"
__all__ = [
    "AdapterV1Config", "AdapterV2Config", "KVCache", "LavinConfig", "LlamaLM", "ModelConfig", "Sampling",
    "Tokenizer", "attach", "build_model", "count_trainable", "disable_compiled_decode", "enable_compiled_decode",
    "fold", "generate", "load_adapter", "load_pretrained",
    "save_adapter", "stream", "trainable_parameters",
]

"""The methods: each registers itself on import."""

from . import adapter_v1  # noqa: F401  (registers)
from .adapter_v1 import AdapterV1Config
from .io import load_adapter, save_adapter
from .registry import REGISTRY, attach, count_trainable, trainable_parameters

__all__ = ["REGISTRY", "AdapterV1Config", "attach", "count_trainable", "load_adapter", "save_adapter",
           "trainable_parameters"]

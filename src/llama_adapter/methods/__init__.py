"""The methods: each registers itself on import."""

from . import adapter_v1, adapter_v2, lavin  # noqa: F401  (register themselves)
from .adapter_v1 import AdapterV1Config
from .adapter_v2 import AdapterV2Config
from .fold import fold
from .io import load_adapter, save_adapter
from .lavin import LavinConfig
from .registry import REGISTRY, attach, count_trainable, trainable_parameters

__all__ = ["REGISTRY", "AdapterV1Config", "AdapterV2Config", "LavinConfig", "attach", "count_trainable", "fold",
           "load_adapter", "save_adapter", "trainable_parameters"]

"""Data formats, templates, tokenization with label masks, collation."""

from .multimodal import MultimodalBatch, collate_multimodal, encode_conversation, read_captions, read_llava
from .sources import DataConfig, load_source
from .templates import alpaca_prompt
from .tokenize import IGNORE, Batch, Example, collate, encode_pair

__all__ = ["IGNORE", "Batch", "DataConfig", "Example", "MultimodalBatch", "alpaca_prompt", "collate",
           "collate_multimodal", "encode_conversation", "encode_pair", "load_source", "read_captions",
           "read_llava"]

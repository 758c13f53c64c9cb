"""Data formats, templates, tokenization with label masks, collation."""

from .instructions import DataConfig, load_instruction_data
from .templates import alpaca_prompt
from .tokenize import IGNORE, Batch, Example, collate, encode_pair

__all__ = ["IGNORE", "Batch", "DataConfig", "Example", "alpaca_prompt", "collate", "encode_pair",
           "load_instruction_data"]

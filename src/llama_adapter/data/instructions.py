"""Instruction data sets: records -> templated, tokenized examples, with long prompts reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..model.tokenizer import Tokenizer
from .formats import read_alpaca
from .templates import TEMPLATES, render_prompt
from .tokenize import Example, PromptTooLong, encode_pair

log = logging.getLogger(__name__)
FORMATS = ("alpaca",)


@dataclass
class DataConfig:
    train: str = ""
    format: str = "alpaca"
    val: str | None = None
    val_size: int = 0  # with no val file: hold out this many training records (the last ones)
    template: str = "alpaca"  # "alpaca" or "chat" (the tokenizer's chat template)
    max_len: int = 512
    on_long_prompt: str = "error"  # "error", or "skip" (and report the records)
    limit: int | None = None  # use only the first N records

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown data format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.on_long_prompt not in ("error", "skip"):
            raise ValueError(f"on_long_prompt must be 'error' or 'skip', got {self.on_long_prompt!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")


def encode_records(records, tok: Tokenizer, cfg: DataConfig) -> list[Example]:
    examples, too_long = [], []
    for r in records:
        prompt, special = render_prompt(cfg.template, tok, r.instruction, r.input)
        try:
            examples.append(encode_pair(tok, prompt, r.output, cfg.max_len, r.source, special))
        except PromptTooLong as e:
            too_long.append(str(e))
    if too_long:
        listing = "\n  ".join(too_long[:10]) + (f"\n  ... and {len(too_long) - 10} more" if len(too_long) > 10 else "")
        if cfg.on_long_prompt == "error":
            raise ValueError(f"{len(too_long)} record(s) have prompts that fill max_len={cfg.max_len} "
                             f"(raise max_len, or set on_long_prompt: skip):\n  {listing}")
        log.warning("skipping %d record(s) whose prompts fill max_len=%d:\n  %s", len(too_long), cfg.max_len,
                    listing)
    return examples


def load_instruction_data(cfg: DataConfig, tok: Tokenizer) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples."""
    if not cfg.train:
        raise ValueError("data.train is not set: give the path of an Alpaca JSON/JSONL file")
    records = read_alpaca(Path(cfg.train))
    if cfg.limit:
        records = records[: cfg.limit]
    if cfg.val:
        val_records = read_alpaca(Path(cfg.val))
    elif cfg.val_size:
        if cfg.val_size >= len(records):
            raise ValueError(f"val_size={cfg.val_size} leaves no training records out of {len(records)}")
        records, val_records = records[: -cfg.val_size], records[-cfg.val_size:]
    else:
        val_records = []
    return encode_records(records, tok, cfg), encode_records(val_records, tok, cfg)

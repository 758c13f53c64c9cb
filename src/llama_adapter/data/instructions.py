"""Alpaca instruction records -> templated, tokenized examples, with long prompts reported."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..model.tokenizer import Tokenizer
from .formats import InstructionRecord
from .templates import render_prompt
from .tokenize import Example, PromptTooLong, encode_pair

log = logging.getLogger(__name__)


def report_long_prompts(messages: list[str], cfg: Any) -> None:
    """Raise (or, with on_long_prompt: skip, log) the records whose prompt fills max_len."""
    if not messages:
        return
    listing = "\n  ".join(messages[:10]) + (f"\n  ... and {len(messages) - 10} more" if len(messages) > 10 else "")
    if cfg.on_long_prompt == "error":
        raise ValueError(f"{len(messages)} record(s) have prompts that fill max_len={cfg.max_len} "
                         f"(raise max_len, or set on_long_prompt: skip):\n  {listing}")
    log.warning("skipping %d record(s) whose prompts fill max_len=%d:\n  %s", len(messages), cfg.max_len, listing)


def encode_records(records: Sequence[InstructionRecord], tok: Tokenizer, cfg: Any) -> list[Example]:
    """Instruction records -> Examples with the prompt masked from the loss; over-long prompts as cfg says."""
    examples, too_long = [], []
    for r in records:
        prompt, special = render_prompt(cfg.template, tok, r.instruction, r.input)
        try:
            examples.append(encode_pair(tok, prompt, r.output, cfg.max_len, r.source, special, cfg.kind))
        except PromptTooLong as e:
            too_long.append(str(e))
    report_long_prompts(too_long, cfg)
    return examples

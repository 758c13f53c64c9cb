"""Reading words from images through an expert, with no training: is the word in the reply?

The question is "What word is written in the image?"; a reply counts as right when it contains
the word as a whole word (the base model phrases answers freely), case-insensitively."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..experts import Expert, expert_prompt_ids
from ..generate import Sampling, complete_ids
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer

QUESTION = "What word is written in the image? Answer with the word only."


def ocr_replies(model: LlamaLM, tok: Tokenizer, records: list[dict[str, Any]], root: Path, experts: list[Expert],
                template: str = "chat", max_new_tokens: int = 16) -> list[str]:
    """Greedy replies to "what word is written" for each record's image, the experts' texts in the prompt."""
    ids = [expert_prompt_ids(tok, QUESTION, root / r["image"], experts, template) for r in records]
    return complete_ids(model, tok, ids, Sampling(max_new_tokens=max_new_tokens))


def contains_word(reply: str, word: str) -> bool:
    """Whether `word` appears in `reply` as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word.lower())}\b", reply.lower()) is not None


def ocr_word_accuracy(model: LlamaLM, tok: Tokenizer, records: list[dict[str, Any]], root: Path, experts: list[Expert],
                      template: str = "chat") -> float:
    """Fraction of records whose reply contains the written word (`contains_word`)."""
    replies = ocr_replies(model, tok, records, root, experts, template)
    return sum(contains_word(rep, r["answer"]) for rep, r in zip(replies, records)) / max(len(records), 1)

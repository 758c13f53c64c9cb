"""Prompt/response pairs -> token ids with a label mask (loss only on the response)."""

from __future__ import annotations

import torch

from ..batch import IGNORE, Batch, Example
from ..model.tokenizer import Tokenizer

# IGNORE, Batch and Example live in batch.py (methods and the loss use them too); re-exported here
__all__ = ["IGNORE", "Batch", "Example", "PromptTooLong", "collate", "encode_pair"]


class PromptTooLong(ValueError):
    pass


def encode_pair(tok: Tokenizer, prompt: str, response: str, max_len: int, source: str,
                add_special_tokens: bool = True, kind: str = "instruction") -> Example:
    """Encode prompt + response + EOS; the response (and EOS) are the labels.

    A prompt that leaves no room for a single response token is an error naming the record;
    a long response is truncated to fit `max_len`.
    """
    p = tok.encode(prompt, add_special_tokens=add_special_tokens)
    r = tok.encode(response, add_special_tokens=False) + [min(tok.eos_ids) if tok.hf.eos_token_id is None
                                                          else tok.hf.eos_token_id]
    if len(p) >= max_len:
        raise PromptTooLong(f"{source}: the prompt alone is {len(p)} tokens, which fills the maximum "
                            f"length of {max_len}; nothing of the response would be trained on")
    ids = (p + r)[:max_len]
    labels = ([IGNORE] * len(p) + r)[:max_len]
    return Example(ids, labels, source, kind)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad: with a causal mask, trailing padding never influences real tokens."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    n = int((labels[:, 1:] != IGNORE).sum())
    return Batch(ids, labels, examples[0].kind, n)

"""The training loss, shared by the trainer and evaluation (neither imports the other).

The attached method lays out a batch (images, inserted tokens) when it prepares inputs; the
output head runs only at positions whose next token is a label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .batch import IGNORE, Batch

if TYPE_CHECKING:
    from .model.llama import LlamaLM


def label_logits(model: LlamaLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], targets [N], row of each [N]) at the N positions whose next token is a
    label, laid out by the attached method (images, inserted tokens); the output head runs only there."""
    adapter = model.adapter
    if adapter is not None and adapter.prepares_inputs:
        inputs, labels = adapter.prepare_batch(model, batch)
    else:
        inputs, labels = {"input_ids": batch.input_ids}, batch.labels
    target_mask = labels[:, 1:] != IGNORE
    logits = model(**inputs, output_positions=F.pad(target_mask, (0, 1)))
    return logits, labels[:, 1:][target_mask], target_mask.nonzero()[:, 0]


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits` [N, vocab] (any float dtype, computed in fp32) against `targets` [N], summed."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


_cross_entropy: ContextVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = ContextVar(
    "cross_entropy", default=summed_cross_entropy)


@contextlib.contextmanager
def cross_entropy_by(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """`lm_loss` computes its cross-entropy with `fn` in this context (the compiled training step's fused one,
    train/compiled.py)."""
    token = _cross_entropy.set(fn)
    try:
        yield
    finally:
        _cross_entropy.reset(token)


def lm_loss(model: LlamaLM, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions."""
    logits, targets, _ = label_logits(model, batch)
    return _cross_entropy.get()(logits, targets)

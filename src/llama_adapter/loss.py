"""The training loss, shared by the trainer and evaluation (neither imports the other).

The attached method lays out a batch (images, inserted tokens) when it prepares inputs; the
output head runs only at positions whose next token is a label.
"""

from __future__ import annotations

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


def lm_loss(model: LlamaLM, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions."""
    logits, targets, _ = label_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")

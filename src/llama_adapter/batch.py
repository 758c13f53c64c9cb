"""The batch types every layer passes around, in one low-level module.

Data builds `Example`s and collates them into `Batch`es, the trainer and evaluation feed those to
the loss, and a method turns a prompt batch into a `PreparedBatch` for generation; keeping the
types here lets methods and the model use them without importing data or generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # the label of a position that takes no loss (prompt, template text, padding)


@dataclass
class Example:
    """One tokenized training record: ids, labels (IGNORE where no loss is taken), its source, its data kind."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    source: str
    kind: str = "instruction"


@dataclass
class Batch:
    """Collated examples of one data kind, right-padded, with the count of label tokens for the loss."""

    input_ids: torch.Tensor  # [B, T], right-padded
    labels: torch.Tensor  # [B, T], IGNORE at prompt and padding
    kind: str
    n_label_tokens: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.kind, self.n_label_tokens)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class PreparedBatch:
    """What the model is fed for a prompt batch: embeddings (or ids), mask and method inputs."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor
    extras: dict[str, Any]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

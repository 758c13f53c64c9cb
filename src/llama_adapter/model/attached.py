"""The interface of the method attached at `model.adapter`, as the layers above the model see it.

The model knows no method: it offers hooks, and keeps whatever `attach` put at `model.adapter`.
Generation, evaluation, the command line and the trainer ask that object, and only it, the
questions about an attached model (does it take images, lay out its own inputs, leave the
forward pass plain?) and, for training, its parameter groups and its checkpoints. Both
protocols are structural: `methods.registry.Attached` implements them without importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..batch import PreparedBatch

if TYPE_CHECKING:
    from .llama import LlamaLM


class AttachedMethod(Protocol):
    """What inference asks of an attached method."""

    method: str  # the registry name, e.g. "lavin"
    config: Any
    # (model, ids [B, T] left-padded, mask [B, T], images or None) -> the batch to feed, for generation
    prepare_inputs: Callable[..., PreparedBatch] | None
    # (model, Batch) -> (keyword inputs of the model, labels laid out like them), for training and scoring
    prepare_batch: Callable[..., tuple[dict[str, Any], torch.Tensor]] | None

    @property
    def prepares_inputs(self) -> bool:
        """Prompts and batches go through prepare_inputs / prepare_batch (images, inserted tokens)."""
        ...

    @property
    def takes_images(self) -> bool:
        """Images given with a prompt reach the model."""
        ...

    @property
    def plain(self) -> bool:
        """Nothing of the method is left in the forward pass (everything it trained was folded away)."""
        ...


class TrainableAdapter(AttachedMethod, Protocol):
    """What the trainer asks of an attached method: it knows parameter groups and data kinds, not methods."""

    groups: dict[str, list[str]]  # group name -> parameter names (as in model.named_parameters())
    kind_groups: dict[str, list[str]]  # data kind -> the groups it trains; kinds not listed train every group

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier}."""
        ...

    def trainable_parameters(self, model: LlamaLM) -> dict[str, torch.nn.Parameter]:
        """{name: parameter} of everything the method trains."""
        ...

    def save(self, model: LlamaLM, folder: str | Path) -> Path:
        """Write the adapter checkpoint (trained tensors, state buffers, config) into `folder`."""
        ...

    def load(self, model: LlamaLM, folder: str | Path) -> None:
        """Load the tensors of an adapter checkpoint of this method into the model."""
        ...


def prepares_inputs(model: LlamaLM) -> bool:
    """Whether prompts to this model go through the attached method's prepare_inputs."""
    return model.adapter is not None and model.adapter.prepares_inputs


def takes_images(model: LlamaLM) -> bool:
    """Whether images given with a prompt reach this model (a text-only model gets the text, or an expert's)."""
    return model.adapter is not None and model.adapter.takes_images


def method_is_plain(model: LlamaLM) -> bool:
    """Whether the attached method (if any) leaves the forward pass the bare base model's."""
    return model.adapter is None or model.adapter.plain

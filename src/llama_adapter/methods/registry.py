"""What every method provides, and the registry that maps names to methods.

A method is one module with a config dataclass and an `attach(model, cfg)` function (LaVIN's
also takes the tokenizer: `Method.needs_tokenizer`) that inserts its modules into the model's
hooks and returns an `Attached` record: which parameters it trains, in named groups (so V2's
disjoint groups are data, not code paths).
`Attached` is also the one place that answers questions about an attached model (takes
images? prepares its inputs? plain?) and what the trainer needs (groups, data kinds, saving
and loading): it implements the protocols of model/attached.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batch import PreparedBatch
from ..configs import build_config
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer


@dataclass
class Attached:
    """The state of a method attached to a model."""

    method: str
    config: Any
    # group name -> parameter names (as in model.named_parameters()); every trained parameter is in one group
    groups: dict[str, list[str]]
    # data kind -> the groups it trains (joint training); kinds not listed train every group
    kind_groups: dict[str, list[str]] = field(default_factory=dict)
    # group name -> learning-rate multiplier (groups not listed: 1), e.g. `visual_lr_scale` of V1
    # and V2: a projector trained from scratch wants larger steps than tuned prompts and biases
    lr_scale: dict[str, float] = field(default_factory=dict)
    # parameter-name prefix -> a further multiplier inside its group (V2's query projector, a small
    # transformer from scratch, diverges at the step size that its group's prompts and gates want)
    prefix_lr_scale: dict[str, float] = field(default_factory=dict)
    # buffers that are state, not trained, yet saved with the adapter (running feature statistics)
    buffers: list[str] = field(default_factory=list)
    # optional: embeddings and per-example inputs for a prompt batch (images, modality tokens),
    # for generation (prepare_inputs) and for training batches (prepare_batch)
    prepare_inputs: Callable[..., PreparedBatch] | None = None
    prepare_batch: Callable[..., tuple[dict[str, Any], torch.Tensor]] | None = None
    # whether images given with a prompt reach the model; None: exactly when the method prepares inputs
    # (a text-only LaVIN prepares inputs, its modality token, yet takes no image)
    images: bool | None = None

    def __post_init__(self) -> None:
        bad = {g: s for g, s in {**self.lr_scale, **self.prefix_lr_scale}.items() if not s > 0}
        if bad:
            raise ValueError(f"{self.method}: learning-rate multipliers must be > 0, got {bad}")
        if (self.prepare_inputs is None) != (self.prepare_batch is None):
            raise ValueError(f"{self.method}: prepare_inputs and prepare_batch come together (generation and "
                             f"training must lay out a sequence alike)")
        if self.images and self.prepare_inputs is None:
            raise ValueError(f"{self.method}: a method that takes images must prepare its inputs")

    # -- the questions about an attached model (model.attached.AttachedMethod) -------------------
    @property
    def prepares_inputs(self) -> bool:
        """Prompts and training batches go through prepare_inputs / prepare_batch (images, inserted tokens)."""
        return self.prepare_inputs is not None

    @property
    def takes_images(self) -> bool:
        """Images given with a prompt reach the model (else a caller gives the problem as text, or an
        expert's text about the image)."""
        return self.prepares_inputs if self.images is None else self.images

    @property
    def plain(self) -> bool:
        """Nothing of the method is left in the forward pass (no inputs to prepare, no parameters or state),
        e.g. once everything it trained was folded into the base weights."""
        return not self.prepares_inputs and not self.parameter_names() and not self.buffers

    def parameter_names(self) -> list[str]:
        return [n for names in self.groups.values() for n in names]

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier}."""
        def within(name: str) -> float:
            return next((s for prefix, s in self.prefix_lr_scale.items() if name.startswith(prefix)), 1.0)

        return {n: self.lr_scale.get(g, 1.0) * within(n) for g, names in self.groups.items() for n in names}

    # -- what the trainer needs (model.attached.TrainableAdapter) --------------------------------
    def trainable_parameters(self, model: LlamaLM) -> dict[str, torch.nn.Parameter]:
        """{name: parameter} of everything this method trains."""
        params = dict(model.named_parameters())
        return {n: params[n] for n in self.parameter_names()}

    def save(self, model: LlamaLM, folder: str | Path) -> Path:
        """Write this adapter's checkpoint (methods.io) into `folder`."""
        from .io import save_adapter  # io builds on this module

        return save_adapter(model, folder)

    def load(self, model: LlamaLM, folder: str | Path) -> None:
        """Load the tensors of a checkpoint of this method (methods.io) into the model."""
        from .io import load_adapter  # io builds on this module

        if model.adapter is not self:
            raise ValueError(f"this {self.method} adapter is not the one attached to the model")
        load_adapter(model, folder)


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    # (model, config) -> Attached; with needs_tokenizer, (model, config, tokenizer or None) -> Attached
    attach: Callable[..., Attached]
    needs_tokenizer: bool = False  # the method encodes texts of its own (LaVIN's "Image:" prefix)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def method_for_config(cfg: Any) -> Method:
    for m in REGISTRY.values():
        if isinstance(cfg, m.config_cls):
            return m
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered method ({', '.join(REGISTRY)})")


def config_from_dict(name: str, values: dict[str, Any]) -> Any:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return build_config(REGISTRY[name].config_cls, values, f"the options of method {name!r}")


def attach(model: LlamaLM, cfg: Any, tokenizer: Tokenizer | None = None) -> LlamaLM:
    """Insert a method's modules into a frozen model; only its parameters will train.

    `tokenizer`: the model's tokenizer, for a method that encodes texts of its own (LaVIN); others ignore it.
    It may be left out on the meta device, where nothing runs (counting parameters)."""
    if model.adapter is not None:
        raise ValueError(f"a {model.adapter.method} adapter is already attached to this model")
    method = method_for_config(cfg)
    if method.needs_tokenizer and tokenizer is None and model.device.type != "meta":
        raise ValueError(f"{method.name} encodes texts of its own with the model's tokenizer: attach it with "
                         f"la.attach(model, config, tokenizer=tok) (la.load_adapter(model, folder, tokenizer=tok) "
                         f"when loading a checkpoint)")
    model.requires_grad_(False)
    attached = method.attach(model, cfg, tokenizer) if method.needs_tokenizer else method.attach(model, cfg)
    model.adapter = attached
    params = dict(model.named_parameters())
    for name in attached.parameter_names():
        params[name].requires_grad_(True)
    return model


def trainable_parameters(model: LlamaLM) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what the attached method trains (empty when none is attached)."""
    return {} if model.adapter is None else model.adapter.trainable_parameters(model)


def adapter_tensors(model: LlamaLM) -> dict[str, torch.Tensor]:
    """Everything an adapter checkpoint holds: the trainable parameters and the method's state buffers."""
    tensors: dict[str, torch.Tensor] = dict(trainable_parameters(model))
    if model.adapter is not None and model.adapter.buffers:
        buffers = dict(model.named_buffers())
        tensors.update({n: buffers[n] for n in model.adapter.buffers})
    return tensors


def count_trainable(model: LlamaLM) -> int:
    """How many values the attached method trains."""
    return sum(p.numel() for p in trainable_parameters(model).values())

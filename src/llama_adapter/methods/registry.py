"""What every method provides, and the registry that maps names to methods.

A method is one module with a config dataclass and an `attach(model, cfg)` function that
inserts its modules into the model's hooks and returns an `Attached` record: which
parameters it trains, in named groups (so V2's disjoint groups are data, not code paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..configs import build_config
from ..model.llama import LlamaLM


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
    prepare_inputs: Callable[..., Any] | None = None
    prepare_batch: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        bad = {g: s for g, s in {**self.lr_scale, **self.prefix_lr_scale}.items() if not s > 0}
        if bad:
            raise ValueError(f"{self.method}: learning-rate multipliers must be > 0, got {bad}")

    def parameter_names(self) -> list[str]:
        return [n for names in self.groups.values() for n in names]

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier}."""
        def within(name: str) -> float:
            return next((s for prefix, s in self.prefix_lr_scale.items() if name.startswith(prefix)), 1.0)

        return {n: self.lr_scale.get(g, 1.0) * within(n) for g, names in self.groups.items() for n in names}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    attach: Callable[[LlamaLM, Any], Attached]


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


def attach(model: LlamaLM, cfg: Any) -> LlamaLM:
    """Insert a method's modules into a frozen model; only its parameters will train."""
    if model.adapter is not None:
        raise ValueError(f"a {model.adapter.method} adapter is already attached to this model")
    model.requires_grad_(False)
    attached = method_for_config(cfg).attach(model, cfg)
    model.adapter = attached
    params = dict(model.named_parameters())
    for name in attached.parameter_names():
        params[name].requires_grad_(True)
    return model


def trainable_parameters(model: LlamaLM) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of what the attached method trains (empty when none is attached)."""
    if model.adapter is None:
        return {}
    params = dict(model.named_parameters())
    return {n: params[n] for n in model.adapter.parameter_names()}


def adapter_tensors(model: LlamaLM) -> dict[str, torch.Tensor]:
    """Everything an adapter checkpoint holds: the trainable parameters and the method's state buffers."""
    tensors: dict[str, torch.Tensor] = dict(trainable_parameters(model))
    if model.adapter is not None and model.adapter.buffers:
        buffers = dict(model.named_buffers())
        tensors.update({n: buffers[n] for n in model.adapter.buffers})
    return tensors


def count_trainable(model: LlamaLM) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())

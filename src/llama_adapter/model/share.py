"""A second model object over the same frozen weights, so that many adapters share one base.

Why: a method attaches its modules into the model's hooks, so one model holds one adapter. A
server that holds many adapters gives each its own copy of the module tree whose parameters and
buffers are the base's own tensors: each extra adapter costs its own weights and a few Python
objects, not another base.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .llama import LlamaLM, RMSNorm


def weight_sharing_copy(model: LlamaLM) -> LlamaLM:
    """A plain copy of `model`'s module tree that shares every parameter and buffer tensor with it, but the
    norms' weights, which the copy owns: V2 tunes them, and loading its adapter writes them in place.

    The model must have nothing attached (attach the adapter to the copy); its projections may be fused
    (model/fused.py): the joint tensors are shared too, so the copy keeps the fused path.
    """
    if model.adapter is not None:
        raise ValueError(f"a {model.adapter.method} adapter is attached: copy the bare base model")
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in norms:
            memo[id(t)] = t
    for m in model.modules():
        joint = m.__dict__.get("_joint")
        if joint is not None:
            memo[id(joint)] = joint
    return copy.deepcopy(model, memo)


def reshare_unchanged(base: LlamaLM, model: LlamaLM) -> None:
    """Point `model`'s own copies of base parameters (the norms `weight_sharing_copy` copied) back at the
    base's tensors where the attached method does not train them and they still equal the base's: an adapter
    that tunes no norm then costs only its own weights."""
    trained = set(model.adapter.parameter_names()) if model.adapter is not None else set()
    base_params = dict(base.named_parameters())
    for name, p in list(model.named_parameters()):
        b = base_params.get(name)
        if b is None or b is p or name in trained or b.shape != p.shape or not torch.equal(b, p):
            continue
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, b)


def written_base_weights(base: LlamaLM, model: LlamaLM) -> list[str]:
    """Names of the parameters the method on `model` trains that are still the base's own tensors: loading
    or training them would change the base under every other copy."""
    shared = {t.untyped_storage().data_ptr() for t in base.parameters()}
    trained = model.adapter.parameter_names() if model.adapter is not None else []
    params = dict(model.named_parameters())
    return [n for n in trained if params[n].untyped_storage().data_ptr() in shared]


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by distinct storages among `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())

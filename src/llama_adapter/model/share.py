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

from .llama import LlamaLM


def weight_sharing_copy(model: LlamaLM) -> LlamaLM:
    """A plain copy of `model`'s module tree that shares every parameter and buffer tensor with it.

    The model must have nothing attached (attach the adapter to the copy); its projections may be fused
    (model/fused.py): the joint tensors are shared too, so the copy keeps the fused path.
    """
    if model.adapter is not None:
        raise ValueError(f"a {model.adapter.method} adapter is attached: copy the bare base model")
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        memo[id(t)] = t
    for m in model.modules():
        joint = m.__dict__.get("_joint")
        if joint is not None:
            memo[id(joint)] = joint
    out = copy.deepcopy(model, memo)
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in out.parameters()), "a parameter was copied, not shared"
    return out


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by distinct storages among `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())

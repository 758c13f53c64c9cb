"""One matmul for q/k/v and one for gate/up at inference, without a second copy of the weights.

Why: at batch 1 every linear is a matrix-vector product whose cost is partly per call, so on a
CPU three small q/k/v products cost about 1.6x one product over their concatenated weights,
and a bias (a folded V2 model has one on every linear) adds a few microseconds per call.
`fuse_projections(model)` moves the frozen weights (and biases) of each group into one tensor
and makes each linear's parameter a view of its rows, so memory stays the same and
`load_state_dict` still writes through. `project(linears, x)` uses the joint tensor only
while it is exactly what the separate linears would compute: each linear plain (no scale,
extra bias, LoRA or module hooks), its weight still the recorded view (folding, `.to()` or a
new parameter break that, and the separate path takes over), and no weight needing a
gradient. `generate_tokens` calls `fuse_projections` (cheap when nothing changed). The compiled decode step
(model/fastpath.py) reads them through `joint_of` for batches of more than one row, and applies each linear's
scale and extra bias after the split itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # llama.py imports this module
    from .llama import AdaptableLinear

Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # makes an uninitialised tensor (on the CPU)
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


@dataclass
class JointProjection:
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: list[int]
    pointers: list[tuple[int, int]]  # (weight, bias) data pointers of the views, 0 for no bias


def _pointers(linears: Sequence[AdaptableLinear]) -> list[tuple[int, int]]:
    return [(m.weight.data_ptr(), 0 if m.bias is None else m.bias.data_ptr()) for m in linears]


def has_module_hooks(m: nn.Module) -> bool:
    """PyTorch forward (pre-)hooks on this module: its output may not be what its forward computes."""
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))


def _plain(m: AdaptableLinear) -> bool:
    """Exactly the frozen nn.Linear: nothing adapted (`AdaptableLinear.plain`), hooked or trained."""
    return (m.plain and not has_module_hooks(m)
            and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad))


def joint_of(linears: Sequence[AdaptableLinear]) -> JointProjection | None:
    """The group's joint tensors when they still back every linear, else None (and a stale joint
    tensor, left behind by `.to()` or folding, is dropped so that its memory is freed). What the linears add to
    their outputs is the caller's business (`project` checks; the compiled decode step applies it itself)."""
    joint = getattr(linears[0], "_joint", None)
    if joint is None or len(joint.sizes) != len(linears):
        return None
    if all(getattr(m, "_joint", None) is joint for m in linears) and _pointers(linears) == joint.pointers:
        return joint
    for m in linears:
        m.__dict__.pop("_joint", None)
    return None


@torch.no_grad()
@torch.inference_mode(False)
def _fuse_group(linears: Sequence[AdaptableLinear], empty: Empty | None) -> None:
    if any(m.quantized is not None for m in linears):  # packed low-bit weights (model/quantize.py): separate
        return
    if joint_of(linears) is not None:
        return
    if len({(m.weight.dtype, m.weight.device, m.in_features) for m in linears}) != 1:
        return
    if len({m.bias is None for m in linears}) != 1 or any(m.weight.requires_grad for m in linears):
        return
    weight = _cat([m.weight.detach() for m in linears], empty)
    bias = None if linears[0].bias is None else _cat([m.bias.detach() for m in linears], empty)
    sizes = [m.out_features for m in linears]
    start = 0
    for m, n in zip(linears, sizes):
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    joint = JointProjection(weight, bias, sizes, _pointers(linears))
    for m in linears:
        m.__dict__["_joint"] = joint  # a plain attribute (not a module or tensor) beside the parameters


def _cat(parts: list[torch.Tensor], empty: Empty | None) -> torch.Tensor:
    """The parts' rows as one tensor, made by `empty` when given (the loader's huge-page arena)."""
    if empty is None:
        return torch.cat(parts)
    return torch.cat(parts, out=empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), parts[0].dtype))


def fuse_projections(model: nn.Module, empty: Empty | None = None) -> None:
    """Back each block's q/k/v and gate/up weights by one tensor per group (idempotent). `empty(shape, dtype)`
    makes the joint tensors where the caller wants them (model/hugepages.py); default: PyTorch's allocator."""
    for layer in getattr(model, "layers", ()):
        for parent, names in GROUPS:
            _fuse_group([getattr(getattr(layer, parent), n) for n in names], empty)


def project(linears: Sequence[AdaptableLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of `linears` on `x`: one matmul over the joint weight when valid and no gradient is recorded,
    else one each (training-shaped products over the joint weight ran 0.62x the separate ones, forward and
    backward, on the Xeon: docs/benchmarks.md)."""
    if not torch.is_grad_enabled():  # first: joint_of compares data pointers, which a compiled training step cannot
        joint = joint_of(linears)
        if joint is not None and all(_plain(m) for m in linears):
            return list(F.linear(x, joint.weight, joint.bias).split(joint.sizes, dim=-1))
    return [m(x) for m in linears]

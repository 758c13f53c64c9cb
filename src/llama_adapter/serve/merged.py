"""A mixed decode batch's hooks as per-row tensors: one prompt attention and one adapter per hook, whatever the mix.

Calling each adapter's own hooks on its own rows costs a gather, a few small operators and a scatter per
adapter, layer and hook, so a step of a batch spread over several adapters grew slower with every adapter
in it. Instead, when the batch's rows change, each layer's prompt keys/values (padded to the longest
prompt, masked past each row's own) and gates (0 for rows without a prompt), and each adapter slot's
down- and up-projections (dense per row, the routing weights and the scale folded in, zero for rows
without an adapter) are stacked once; each step then runs one batched prompt attention and one batched
adapter per hook. The terms come from the hooks' `decode_terms` (the compiled decode step's interface),
so a hook without it leaves the batch on the per-adapter path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..methods.prefix import prompt_attention
from ..model.fastpath import ADAPTER_SLOTS, decodes_fast, hook_terms
from ..model.llama import Block


@dataclass
class RowPrompts:
    """One layer's gated prompts for every row of the batch."""

    k: torch.Tensor  # [n, G, P, d]
    v: torch.Tensor
    gate: torch.Tensor  # [n, H]: 0 where a row has no prompt
    bias: torch.Tensor | None  # [n, 1, 1, P] additive, -inf on a shorter prompt's padding; None: no padding

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        out = prompt_attention(q, self.k.to(q.dtype), self.v.to(q.dtype), self.bias)
        return self.gate.to(q.dtype).view(*self.gate.shape, 1, 1) * out


@dataclass
class RowAdapters:
    """One slot's routed adapters for every row: h + U_r (D_r h + d_r) + u_r, scale and routing folded into U_r, u_r."""

    down: torch.Tensor  # [n, R, C]
    down_b: torch.Tensor  # [n, R]
    up: torch.Tensor  # [n, C, R]
    up_b: torch.Tensor  # [n, C]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.dtype)  # [n, T, C]
        hidden = torch.baddbmm(self.down_b.unsqueeze(1), x, self.down.transpose(1, 2))
        return h + torch.baddbmm(self.up_b.unsqueeze(1), hidden, self.up.transpose(1, 2)).to(h.dtype)


@dataclass
class MergedHooks:
    prompts: dict[int, RowPrompts]  # by layer; a layer no row has a prompt in is absent
    adapters: dict[tuple[int, str], RowAdapters]  # by (layer, slot)


def _block_diagonal(up_w: torch.Tensor) -> torch.Tensor:
    """Grouped up-projections [B, g, C/g, r/g] (GroupedUp: output block i reads hidden block i) as dense [B, C, r]."""
    B, g, o, k = up_w.shape
    eye = torch.eye(g, dtype=up_w.dtype, device=up_w.device).view(1, g, 1, g, 1)
    return (up_w.unsqueeze(3) * eye).reshape(B, g * o, g * k)


def _prompts(entries: list[tuple[torch.Tensor, Any]], n: int) -> RowPrompts:
    """Stack (rows, (k, v, gate, bias None)) of each adapter with a prompt in this layer into per-row tensors."""
    k0 = entries[0][1][0]
    G, d = k0.shape[1], k0.shape[3]
    P = max(terms[0].shape[2] for _, terms in entries)
    H = entries[0][1][2].shape[-1]
    k = k0.new_zeros(n, G, P, d)
    v = torch.zeros_like(k)
    gate = entries[0][1][2].new_zeros(n, H)
    padded = any(terms[0].shape[2] < P for _, terms in entries)
    bias = torch.zeros(n, 1, 1, P, device=k.device) if padded else None
    for rows, (rk, rv, rg, _) in entries:  # an adapter's own prompt: no bias (every row sees all of it)
        m, p = len(rows), rk.shape[2]
        k[rows, :, :p] = rk.to(k.dtype).expand(m, -1, -1, -1)
        v[rows, :, :p] = rv.to(v.dtype).expand(m, -1, -1, -1)
        gate[rows] = rg.to(gate.dtype).expand(m, -1)
        if bias is not None:
            bias[rows, ..., p:] = float("-inf")
    return RowPrompts(k, v, gate, bias)


def _adapters(entries: list[tuple[torch.Tensor, dict[str, Any]]], n: int) -> RowAdapters:
    """Stack (rows, decode terms) of each adapter in this slot into per-row dense projections."""
    first = entries[0][1]["down_w"]
    R = max(t["down_w"].shape[0] for _, t in entries)
    C = first.shape[1]
    down = first.new_zeros(n, R, C)
    down_b = first.new_zeros(n, R)
    up = first.new_zeros(n, C, R)
    up_b = first.new_zeros(n, C)
    for rows, t in entries:
        m, r = len(rows), t["down_w"].shape[0]
        down[rows, :r] = t["down_w"].expand(m, -1, -1)
        down_b[rows, :r] = t["down_b"].expand(m, -1)
        up[rows, :, :r] = t["scale"] * _block_diagonal(t["up_w"]).expand(m, -1, -1)
        up_b[rows] = t["scale"] * t["up_b"].expand(m, -1)
    return RowAdapters(down, down_b, up, up_b)


def merge_hooks(groups: Sequence[Any], n: int) -> MergedHooks | None:
    """The per-row hook tensors of a batch of `n` rows split into row groups (serve/engine.py's RowGroup: the
    adapter's model, its row indices, its hook context); None when a hook cannot give its decode terms."""
    layers = len(groups[0].model.layers)
    prompts: dict[int, RowPrompts] = {}
    adapters: dict[tuple[int, str], RowAdapters] = {}
    for i in range(layers):
        prompt_entries = []
        slot_entries: dict[str, list] = {slot: [] for slot in ADAPTER_SLOTS}
        for g in groups:
            block = cast(Block, g.model.layers[i])
            hooks = [block.self_attn.prefix, *(getattr(block, slot) for slot in ADAPTER_SLOTS)]
            if not all(decodes_fast(h) for h in hooks if h is not None):
                return None
            prefix, terms = hook_terms(block, g.ctx.cache, g.ctx.extras, len(g.rows))
            if prefix is not None:
                prompt_entries.append((g.rows, prefix))
            for slot, t in terms.items():
                slot_entries[slot].append((g.rows, t))
        if prompt_entries:
            prompts[i] = _prompts(prompt_entries, n)
        for slot, entries in slot_entries.items():
            if entries:
                adapters[(i, slot)] = _adapters(entries, n)
    return MergedHooks(prompts, adapters)

"""Continuous batching: sequences join a running decode batch at token boundaries and leave it when done.

A request is prefilled alone on its own adapter's model (a weight-sharing copy of the base, with
the adapter in its hooks); its keys/values then move into the batch's buffer, and from there on
every step decodes one token for every row in one forward pass of the batch's model.

Rows are right-aligned: each row's newest token sits in column `length - 1`, so one step writes
every row's new keys at the same column and the columns before a row's prompt are masked out.
Positions are counted per row, so a row's columns need not start at 0. A longer newcomer shifts
the buffer right; columns that no live row uses any more are dropped from the left.

The shared batch runs the bare base with dispatchers in every hook: each dispatcher calls the
hooks of each row group's own adapter model on that group's rows (V1's gated prompts, LaVIN's
routed adapters), with the group's prompt keys/values and routing weights from its prefills, so
rows of different adapters (and of the bare base) share one forward pass of the frozen weights. When the
rows belong to several adapters, the dispatchers run the hooks' per-row tensors that serve/merged.py stacks
once per change of the rows instead: one prompt attention and one adapter per hook, whatever the mix.
Adapters that change the frozen linears themselves (V2's scales and biases, LoRA) cannot share it:
they decode in a batch of their own (`shares_base`).

With `compiled` (`serve --compile`), a batch whose rows are all of one adapter (or all of the bare base) decodes on
that model's compiled step (model/fastpath.py: la.generate's default on a CPU, compiled in the background while
the rows decode eagerly), over the batch's own buffers; rows of several adapters decode on the shared model's
compiled step, its dispatchers giving the graph the merged per-row tensors (`decode_terms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..generate import prepare_prompts
from ..model.fastpath import ADAPTER_SLOTS, default_decode
from ..model.fused import has_module_hooks
from ..model.llama import AdaptableLinear, Block, ForwardContext, KVCache, LlamaLM, select_extras
from ..model.tokenizer import Tokenizer
from .merged import MergedHooks, merge_hooks

GROUPS = "serve_row_groups"  # extras of the shared batch: the row groups the dispatchers serve
MERGED = "serve_merged_hooks"  # ... and, for rows of several adapters, their hooks as per-row tensors


def shares_base(model: LlamaLM) -> bool:
    """Whether the adapter on `model` acts only through the hooks (prefix, attn/ffn adapters) and leaves
    every frozen linear exactly the base's (packed or not): then its rows can share a forward pass with other
    adapters."""
    return all(not m.adapted and not has_module_hooks(m) for m in model.modules() if isinstance(m, AdaptableLinear))


@dataclass
class Prefilled:
    """One prompt after its prefill: the next-token logits and what its decode steps need."""

    logits: torch.Tensor  # [V]
    k: torch.Tensor  # [L, 1, G, m, d]
    v: torch.Tensor
    mask: torch.Tensor  # [m] bool: the columns other tokens may attend (LaVIN's modality token: no)
    position: int  # the position of the next token
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]  # prompt keys/values the hooks computed
    state: dict[Any, torch.Tensor]  # per-generation hook state (LaVIN's routing weights)
    extras: dict[str, Any]  # the method's per-row inputs
    columns: int  # the prompt's own columns (m, less the left padding of a prefill shared with longer prompts)
    prompt_logits: torch.Tensor | None = None  # [m - 1, V] the logits after each prompt token but the last (echo)


@torch.inference_mode()
def prefill(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[int], image: Any = None) -> Prefilled:
    """Run one prompt (and its image, for an adapter that takes images) through `model`."""
    return prefill_many(model, tok, [prompt_ids], None if image is None else [image])[0]


@torch.inference_mode()
def prefill_many(model: LlamaLM, tok: Tokenizer, prompts: Sequence[Sequence[int]],
                 images: Sequence[Any] | None = None, every_position: bool = False) -> list[Prefilled]:
    """Run prompts of one model in one left-padded forward pass (requests arriving together wait for one prefill,
    not for each other's); per prompt, what its own prefill gives, its columns left-padded to the longest. A prompt
    with an image is prefilled alone (an image inserts columns of its own, so the padding would not be the
    prompts' difference in length); so is one with `every_position` (its `prompt_logits` too)."""
    if (images is not None or every_position) and len(prompts) > 1:
        raise ValueError("prefill prompts with images, or with logits at every position, one at a time")
    batch = prepare_prompts(model, tok, prompts, images)
    limit = model.config.max_seq_len
    if batch.length >= limit:
        raise ValueError(f"the prompt takes {batch.length} positions, which fills the model's context of {limit} "
                         f"(at least one position must stay free for the answer)")
    cache = model.new_cache(len(prompts), batch.length)
    every = model(batch.input_ids, inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                  cache=cache, extras=batch.extras, output_positions=None if every_position else (slice(None), [-1]))
    logits = every[:, -1]
    longest = max(len(p) for p in prompts)
    out = []
    for i, prompt in enumerate(prompts):
        index = torch.tensor([i], device=logits.device)
        row = cache if len(prompts) == 1 else cache.select_rows(index)
        extras = dict(batch.extras) if len(prompts) == 1 else select_extras(batch.extras, index)
        mask = batch.attention_mask[i].bool()
        out.append(Prefilled(logits[i], row.k, row.v, mask, int(mask.sum()), dict(row.prefix), dict(row.state),
                             extras, batch.length - (longest - len(prompt)), every[i, :-1] if every_position else None))
    return out


@dataclass
class Row:
    """A sequence in a decode batch."""

    model: LlamaLM  # the adapter's model: its hooks act on this row
    key: str  # rows with the same key share hooks (one adapter)
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]
    state: dict[Any, torch.Tensor]
    extras: dict[str, Any]
    position: int
    token: int = -1  # the last token, the next step's input
    owner: Any = None  # the scheduler's record


@dataclass
class RowGroup:
    """The rows of one adapter in a step, with the context its hooks read."""

    model: LlamaLM
    rows: torch.Tensor | None  # row indices; None: every row
    ctx: ForwardContext = field(repr=False)


def _cat_rows(rows: Sequence[Row]) -> tuple[dict, dict, dict]:
    """The rows' prompt keys/values, hook state and extras, stacked along the batch."""
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in rows[0].prefix:
        pairs = [r.prefix[layer] for r in rows]
        same = all(p[0] is pairs[0][0] for p in pairs)  # input-independent prompts are one [1, ...] tensor
        prefix[layer] = pairs[0] if same else (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    state = {key: torch.cat([r.state[key] for r in rows]) for key in rows[0].state}
    extras: dict[str, Any] = {}
    for name in {n for r in rows for n in r.extras}:
        values = [r.extras.get(name) for r in rows]
        like = next(v for v in values if v is not None)
        if isinstance(like, torch.Tensor) and like.dim() > 0:
            extras[name] = torch.cat([v if v is not None else like.new_zeros(like.shape) for v in values])
        else:
            extras[name] = like
    return prefix, state, extras


class DecodeBatch:
    """The running sequences of one model (the shared base, or one adapter that cannot share it)."""

    def __init__(self, model: LlamaLM, shared: bool, compiled: bool = False):
        self.model = model
        self.shared = shared  # dispatchers in the hooks (install_dispatchers); else the rows' own model
        self.compiled = compiled  # decode on compiled steps where they apply (serve --compile)
        self._fast: tuple[Any, ...] | None = None  # rows and buffer the step's cache was made for, the cache, the step
        self.rows: list[Row] = []
        self.length = 0  # columns in use; every row's newest token is in column length - 1
        cfg = model.config
        self._shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
        self.k = self.v = torch.empty(0)
        self.valid = torch.empty(0, dtype=torch.bool)
        self._groups: tuple[list[RowGroup], MergedHooks | None, dict, dict, dict] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.k.shape[1], self.k.shape[3]) if self.k.dim() == 5 else (0, 0)

    def _reserve(self, rows: int, cols: int) -> None:
        """Grow the buffers (doubling, columns up to the context) to hold `rows` x `cols`, keeping the data. Rows
        and columns grow apart: a row joining leaves the width as it is (every width is a shape of the compiled
        step's inputs)."""
        have_rows, have_cols = self.capacity
        if rows <= have_rows and cols <= have_cols:
            return
        limit = self.model.config.max_seq_len
        new_rows = have_rows if rows <= have_rows else max(rows, min(2 * have_rows, max(rows, 64)), 1)
        new_cols = have_cols if cols <= have_cols else min(max(cols, 2 * have_cols, 64), limit)
        if cols > new_cols:
            raise ValueError(f"{cols} columns exceed the model's context of {limit}")
        L, G, d = self._shape
        dt, dev = self.model.dtype, self.model.device
        k = torch.zeros((L, new_rows, G, new_cols, d), dtype=dt, device=dev)
        v = torch.zeros_like(k)
        valid = torch.zeros((new_rows, new_cols), dtype=torch.bool, device=dev)
        n, length = len(self.rows), self.length
        if n and length:
            k[:, :n, :, :length] = self.k[:, :n, :, :length]
            v[:, :n, :, :length] = self.v[:, :n, :, :length]
            valid[:n, :length] = self.valid[:n, :length]
        self.k, self.v, self.valid = k, v, valid

    def _shift(self, delta: int) -> None:
        """Move every row `delta` columns right (delta > 0) or left (delta < 0)."""
        n, length = len(self.rows), self.length
        new = length + delta
        self._reserve(n, new + 1)
        src, dst = (slice(0, length), slice(delta, new)) if delta > 0 else (slice(-delta, length), slice(0, new))
        for buf in (self.k, self.v):
            buf[:, :n, :, dst] = buf[:, :n, :, src].clone()
        self.valid[:n, dst] = self.valid[:n, src].clone()
        if delta > 0:
            self.valid[:n, :delta] = False
        self.length = new

    def admit(self, row: Row, pre: Prefilled) -> None:
        """Add a prefilled sequence; its first token (`row.token`) is decoded at the next step."""
        m = pre.k.shape[3]
        if m > self.length:
            self._shift(m - self.length) if self.rows else setattr(self, "length", m)
        n = len(self.rows)
        self._reserve(n + 1, self.length + 1)
        start = self.length - m
        self.k[:, n, :, start:self.length] = pre.k[:, 0]
        self.v[:, n, :, start:self.length] = pre.v[:, 0]
        self.valid[n, :start] = False
        self.valid[n, start:self.length] = pre.mask
        self.rows.append(row)
        self._groups = None

    def remove(self, indices: Sequence[int]) -> None:
        """Drop rows; the last row moves into each hole (one row's copy, not the whole buffer)."""
        if not indices:
            return  # most steps: the row groups (and their merged hooks) stay as they are
        for i in sorted(set(indices), reverse=True):
            last = len(self.rows) - 1
            if i != last:
                cols = slice(0, self.length)
                self.k[:, i, :, cols] = self.k[:, last, :, cols]
                self.v[:, i, :, cols] = self.v[:, last, :, cols]
                self.valid[i, cols] = self.valid[last, cols]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:  # the buffers go: their memory returns, and the next rows start at the usual shapes
            self.length = 0
            self.k = self.v = torch.empty(0)
            self.valid = torch.empty(0, dtype=torch.bool)
            self._fast = None
        self._groups = None

    def _make_room(self) -> None:
        """Make column `length` writable, with a column to spare below the context's width (a step whose keys
        fill its buffer decodes eagerly: model/fastpath.py): drop columns no row uses, else grow."""
        n, cols = len(self.rows), self.capacity[1]
        spare = int(cols < self.model.config.max_seq_len)
        if self.length + spare < cols:
            return
        used = self.valid[:n, :self.length].any(0)
        unused = int(used.long().argmax()) if bool(used.any()) else self.length
        if unused:
            self._shift(-unused)
        else:
            self._reserve(n, self.length + 1 + spare)

    @torch.inference_mode()  # its tensors are the compiled step's inputs, whose guards tell inference tensors apart
    def _row_groups(self) -> tuple[list[RowGroup], MergedHooks | None, dict, dict, dict]:
        """Per adapter: its rows and hook context; for rows of several adapters, their hooks as per-row tensors;
        and (when not shared) the whole batch's prefix/state/extras."""
        if self._groups is None:
            by_key: dict[str, list[int]] = {}
            for i, r in enumerate(self.rows):
                by_key.setdefault(r.key, []).append(i)
            groups = []
            for indices in by_key.values():
                rows = [self.rows[i] for i in indices]
                prefix, state, extras = _cat_rows(rows)
                index = None if len(indices) == len(self.rows) else torch.tensor(indices, device=self.model.device)
                ctx = ForwardContext(len(rows), KVCache.hook_state(max(self.length, 1), prefix, state), extras)
                groups.append(RowGroup(rows[0].model, index, ctx))
            merged = merge_hooks(groups, len(self.rows)) if self.shared and len(groups) > 1 else None
            whole = ({}, {}, {}) if self.shared else _cat_rows(self.rows)
            self._groups = (groups, merged, *whole)
        return self._groups

    def adapters_in_step(self) -> int:
        return len(self._row_groups()[0])

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Decode one token for every row from its `token`; returns the next-token logits [n, V]."""
        self._make_room()
        n, col = len(self.rows), self.length
        dev = self.model.device
        groups, merged, prefix, state, extras = self._row_groups()
        self.valid[:n, col] = True
        tokens = torch.tensor([r.token for r in self.rows], device=dev)[:, None]
        positions = torch.tensor([r.position for r in self.rows], device=dev)[:, None]
        compiled = self.compiled and (len(groups) == 1 or merged is not None)
        logits = self._compiled_step(groups, merged, tokens, positions) if compiled else None
        if logits is None:
            cache = KVCache.hook_state(col, prefix, state)
            cache.k, cache.v, cache.max_len = self.k[:, :n], self.v[:, :n], self.capacity[1]
            valid = self.valid[:n, :col + 1]
            mask = None if bool(valid.all()) else valid  # no column masked (a lone row): SDPA's unmasked path
            hooks = {GROUPS: groups, MERGED: merged} if self.shared else extras
            logits = self.model(tokens, attention_mask=mask, position_ids=positions, cache=cache, extras=hooks,
                                output_positions=(slice(None), -1))
        self.length += 1
        for r in self.rows:
            r.position += 1
        return logits

    def _compiled_step(self, groups: list[RowGroup], merged: MergedHooks | None, tokens: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor | None:
        """The step on a compiled graph, writing into the batch's buffers: rows all of one adapter on its model's
        graph (with its group's hook context), rows of several on the shared model's (with their merged hooks);
        None where it does not apply (the graph is not compiled yet, or cannot serve this model). One graph serves a
        lone row and one every larger batch (model/fastpath.py)."""
        cols, n = self.capacity[1], len(self.rows)
        made_for = (groups[0] if merged is None else merged, self.k)  # the rows and the buffer: new inputs on a change
        if self._fast is None or any(a is not b for a, b in zip(self._fast[:2], made_for)):
            # whether the graph serves these rows and this buffer is decided once for them, as la.generate decides
            # once per generation (a walk over the model's modules: ~0.3 ms, which every step would pay)
            if merged is None:
                group = groups[0]
                model, extras = group.model if self.shared else self.model, group.ctx.extras
                hooks = cast(KVCache, group.ctx.cache)
                cache = KVCache.hook_state(cols, hooks.prefix, hooks.state)
            else:
                model, extras, cache = self.model, {MERGED: merged}, KVCache.hook_state(cols, {}, {})
            fast = default_decode(model)
            cache.k, cache.v = self.k[:, :n], self.v[:, :n]
            self._fast = (*made_for, cache, extras, fast if fast is not None and fast.usable(cols, n) else None)
        cache, extras, fast = self._fast[2:]
        if fast is None:
            return None
        cache.length, cache.max_len = self.length, cols
        key_valid = self.valid[:n, :cols].clone()
        key_valid[:, self.length + 1:] = False  # columns past the step's may hold what earlier rows left there
        return fast.step(tokens[:, 0], positions[:, 0], cache, key_valid, extras)


def _merged(extras: dict[str, Any]) -> MergedHooks:
    merged = extras.get(MERGED)
    if merged is None:
        raise ValueError("the shared batch's compiled step needs its rows' merged hooks (serve/merged.py)")
    return cast(MergedHooks, merged)


class PrefixDispatch(nn.Module):
    """In the shared model's attention: each group's own gated prompt on its rows (0 where none)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def decode_terms(self, attn: nn.Module, cache: KVCache, extras: dict[str, Any]) -> tuple | None:
        """For the compiled step of a mixed batch: the merged prompts' keys, values, gates and padding bias."""
        prompts = _merged(extras).prompts.get(self.layer)
        return None if prompts is None else (prompts.k, prompts.v, prompts.gate, prompts.bias)

    def forward(self, attn: nn.Module, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        merged: MergedHooks | None = ctx.extras.get(MERGED)
        if merged is not None:
            prompts = merged.prompts.get(self.layer)
            return q.new_zeros(()) if prompts is None else prompts(q)
        out: torch.Tensor | None = None
        for g in ctx.extras[GROUPS]:
            own = cast(Block, g.model.layers[self.layer]).self_attn
            if own.prefix is None:
                continue
            term = own.prefix(own, q if g.rows is None else q.index_select(0, g.rows), g.ctx)
            if g.rows is None:
                return term
            if out is None:
                out = torch.zeros_like(q)
            out.index_copy_(0, g.rows, term.expand(len(g.rows), *q.shape[1:]))
        return q.new_zeros(()) if out is None else out


class AdapterDispatch(nn.Module):
    """In the shared model's block: each group's own attn/ffn adapter on its rows (identity where none)."""

    def __init__(self, layer: int, slot: str):
        super().__init__()
        self.layer, self.slot = layer, slot

    def decode_terms(self, cache: KVCache, rows: int, extras: dict[str, Any]) -> dict[str, Any] | None:
        """For the compiled step of a mixed batch: the merged adapters as per-row projections (model/fastpath.py's
        routed adapter with a down-projection per row, one group, the scale folded in)."""
        adapters = _merged(extras).adapters.get((self.layer, self.slot))
        if adapters is None:
            return None
        return {"down_w": adapters.down, "down_b": adapters.down_b, "up_w": adapters.up.unsqueeze(1),
                "up_b": adapters.up_b, "scale": 1.0}

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        merged: MergedHooks | None = ctx.extras.get(MERGED)
        if merged is not None:
            adapters = merged.adapters.get((self.layer, self.slot))
            return h if adapters is None else adapters(h)
        out = h
        for g in ctx.extras[GROUPS]:
            own = getattr(g.model.layers[self.layer], self.slot)
            if own is None:
                continue
            if g.rows is None:
                return own(h, g.ctx)
            if out is h:
                out = h.clone()
            out.index_copy_(0, g.rows, own(h.index_select(0, g.rows), g.ctx))
        return out


def install_dispatchers(model: LlamaLM) -> LlamaLM:
    """Make a bare weight-sharing copy of the base into the shared batch's model."""
    for i, layer in enumerate(model.layers):
        block = cast(Block, layer)
        block.self_attn.prefix = PrefixDispatch(i)
        for slot in ADAPTER_SLOTS:
            setattr(block, slot, AdapterDispatch(i, slot))
    return model

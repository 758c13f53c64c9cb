"""Inference-only fast paths for single-token decoding (opt-in, with a clean fallback).

`enable_compiled_decode(model)` marks a model so that `generate_tokens` runs each decode step
(one new token per row, after an eager prefill) through one `torch.compile`d graph of the
whole model. Why: at batch 1 every linear is a matrix-vector product and the step is bound
by reading the weights; eager PyTorch's bf16 GEMV reaches only a third of the memory
bandwidth on a CPU, and the ~500 small eager ops per step add milliseconds of dispatch.
Inductor turns the explicit multiply-and-reduce below into vectorised, parallel loops that
stream the weights near the bandwidth bound, and fuses the elementwise work in between.

Adapted models decode through the same graph: after the prefill an adapter's contribution to a
decode step is a function of constants (V1/V2 prompts' keys/values, cached at the prefill; LaVIN's
routing weights, fixed by the modality token at the prefill; V2's scales and extra biases), so
each hook hands its tensors over (`decode_terms`) and the graph computes the same terms. Layers
without a term that others have get a neutral one (gate 0, zero up-projections, scale 1), which adds
exactly nothing, so one graph serves every group of blocks. Where the cache reserved slots ahead of the text
(`KVCache.front`, as la.generate's does), the prompts' keys/values are copied there once per generation and
attended in the same loops as the text's, each span with its own softmax (`_prompts_into_cache`).

The graph is used only while it computes what the eager model computes
(`why_not_compiled`): no low-rank update on a linear (packed int8/int4 weights run through
PyTorch's own kernels in the graph, or for one row its reductions over the int8 weights, equal within
rounding), no hook without `decode_terms`, no PyTorch module hooks, no gradient recording, and no
sliding window the step could exceed. Anything else takes the eager
path, so attaching anything after enabling is safe. A failure to compile disables the fast path
for that model with a warning.

Each step attends only the keys written so far: their number is a dynamic size of the graph, so the work
follows the sequence rather than the cache's length; at 8 rows this made the step 1.3x faster. The cache's
length is dynamic too (one graph for every cache, as fast as one for a fixed length). With the matrix kernel,
q/k/v and gate/up are one product each over the joint weights of model/fused.py (1.05x at 8 rows), and the
batch size is dynamic (as fast as a graph for one size), so one graph serves every batch of two rows or more.

It is the default on a CPU for batches of up to 64 rows (`default_decode`), where it was measured faster (one
row with the reductions below, more with PyTorch's matrix kernel in the same graph: up to 16 rows as W x^T, which
oneDNN ran faster, more as x W^T; `PRODUCTS`), and compiles
in the background: a cold compile takes 20-40 s on a CPU, so a model's first generations decode
eagerly while a worker process (model/compile_worker.py) compiles the graphs for their shapes into
inductor's on-disk cache; at the next token after it finishes, the model compiles them from that
cache (a second or two) and decodes on them. Later processes find the worker's note in the cache and
compile from it at once. `enable_compiled_decode` instead compiles on the first step, in process,
and waits for it (and serves any batch size); `disable_compiled_decode` (or
LLAMA_ADAPTER_FAST_DECODE=0 for the whole process) keeps a model eager.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_has_amx, switched_on
from . import compile_worker
from .fused import GROUPS, has_module_hooks, joint_of
from .llama import BLOCK_LINEARS, AdaptableLinear, Block, KVCache, LlamaLM
from .quantize import packed_matmul

_ATTR = "_compiled_decode"
# On a CPU the graph's linears are multiply-and-sum reductions up to this many rows, which re-read the weights for
# every row; above, PyTorch's matrix kernel (at 2 rows 1.19x the reductions; docs/benchmarks.md, Decoding).
GEMV_MAX_ROWS = 1
# and up to here W x^T (PRODUCTS), on a CPU with AMX only: there oneDNN multiplied 2-16 rows 1.12-1.26x faster
# that way; on an AVX512-BF16 EPYC without AMX x W^T was the faster (decode step 1.33x at 2 rows, 1.20x at 8;
# docs/benchmarks.md, Decoding)
WEIGHT_LEFT_MAX_ROWS = 16
# The default step serves batches up to 64 rows, the largest measured (1.16x eager there, 1.27x at 32).
# enable_compiled_decode serves any batch.
DEFAULT_MAX_ROWS = 64
ENV_SWITCH = "LLAMA_ADAPTER_FAST_DECODE"  # "0" / "off" / "false": no default fast path in this process
MAX_BLOCKS_PER_GRAPH = 10
ADAPTER_SLOTS = ("attn_adapter", "ffn_adapter")  # a Block's routed-adapter hooks (LaVIN), before attention and FFN
RECOMPILE_LIMIT = 256  # graphs per compiled function in one process (dynamo's default: 8)
# Inductor's options for the decode graphs (the background worker compiles with the same, so that their cache
# entries match). A value read by several consumers is stored once rather than recomputed in each: by default the
# normalised hidden state is recomputed inside the reductions of q, k and v (and gate and up) for every output
# row, and the step's blocks took 4% longer (in-process A/B, bf16, batch 1).
COMPILE_OPTIONS: dict[str, Any] = {"realize_reads_threshold": 1}
# The background compile's command (imported rather than run as __main__, so that the job's classes unpickle)
WORKER = [sys.executable, "-c", f"import sys; from {compile_worker.__name__} import main; sys.exit(main())"]


def _gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear written as multiply-and-sum so that inductor emits a streaming reduction.

    Only for use inside a compiled graph: run eagerly it would materialise [B, N, K].
    Accumulates in fp32 like the eager bf16 kernels do, then rounds to the input dtype.
    """
    y = (x.float().unsqueeze(-2) * w.float()).sum(-1)
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


def _weight_left(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a few rows x [B, K], computed as W x^T and transposed back: with the plain-layout weight as the
    left operand oneDNN multiplied 2-16 rows faster (docs/benchmarks.md: the decode step 1.12-1.26x, bf16)."""
    y = torch.mm(w, x.t()).t()
    return y if b is None else y + b


# How the step's linears multiply, by the rows decoded (`CompiledDecode.form_for`): one row as reductions, a few
# with the weight as the left operand, more as F.linear (32 rows: 0.95x, 64: 0.90x the other way round).
PRODUCTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "gemv": _gemv, "weight_left": _weight_left, "matrix": F.linear}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * normed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _packed(x: torch.Tensor, q: tuple[str, torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    """x @ W.T for a packed low-bit W (QuantizedWeight.terms), as the eager linear computes it: the input in the
    scales' dtype, the output back in x's."""
    return packed_matmul(x.to(q[2].dtype), *q).to(x.dtype)


def _int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What `_packed` computes for an int8 weight [N, K] with a scale per output row (the input rounded to the
    scales' dtype, fp32 sums, the output in the scales' dtype), written as multiply-and-sum for one row: inductor's
    reduction over the int8 weights ran the block graphs in 6.8 ms per token on the EPYC where the kernel's calls
    took 10.6 (bf16 weights: 8.7; docs/quantization.md)."""
    sums = (x.to(scales.dtype).float().unsqueeze(-2) * weight.float()).sum(-1)
    return (sums * scales.float()).to(scales.dtype).to(x.dtype)


def _adapted(y: torch.Tensor, t: dict[str, Any], name: str) -> torch.Tensor:
    """The linear `name`'s output with its optional extra bias and scale (an unfolded V2), as AdaptableLinear
    applies them: scale * (W h + b + delta_bias)."""
    if t.get("db" + name) is not None:
        y = y + t["db" + name]
    if t.get("s" + name) is not None:
        y = y * t["s" + name]
    return y


def _linear(h: torch.Tensor, t: dict[str, Any], name: str, form: str) -> torch.Tensor:
    """The block's linear `name` (float or packed) on h."""
    q = t.get("q" + name)
    if q is not None:
        y = _int8_gemv(h, q[1], q[2]) if form == "gemv" and q[0] == "int8" else _packed(h, q)
        y = y if t["b" + name] is None else y + t["b" + name]
    else:
        y = PRODUCTS[form](h, t["w" + name], t["b" + name])
    return _adapted(y, t, name)


def _linears(h: torch.Tensor, t: dict[str, Any], names: tuple[str, ...], form: str) -> list[torch.Tensor]:
    """The outputs of the linears `names` on the same h: one matrix product over their joint weight where `t`
    holds one (model/fused.py; only for the matrix form: 1.17x the separate products at 8 rows), else one each."""
    joint = t.get("joint_" + names[0])
    if joint is None:
        return [_linear(h, t, n, form) for n in names]
    weight, bias, sizes = joint
    return [_adapted(y, t, n) for y, n in zip(PRODUCTS[form](h, weight, bias).split(sizes, -1), names)]


def _routed_adapter(h: torch.Tensor, a: dict[str, Any], form: str) -> torch.Tensor:
    """LaVIN's MM-adapter with its routing weights fixed at prefill: h + s (w0 U0(D h) + w1 U1(D h)), with the
    two up-projections mixed into one per row beforehand (ModalityRoutedAdapter.mixed_up); the down-projection
    is the adapter's, or one per row (`ADAPTER_ROW_RANKS`). On a CPU both projections are written as
    multiply-and-sum, which inductor fuses with the work around them instead of calling two small matmuls."""
    x, down_w, use_gemv = h.to(a["down_w"].dtype), a["down_w"], form == "gemv"
    if use_gemv:
        hidden = _gemv(x, down_w, a["down_b"])
    elif down_w.dim() == 3:  # a down-projection per row (a mixed server batch: serve/merged.py)
        hidden = torch.einsum("bc,brc->br", x, down_w) + a["down_b"]
    else:
        hidden = F.linear(x, down_w, a["down_b"])
    hg = hidden.unflatten(-1, (a["up_w"].shape[1], -1))  # grouped up-projection (GroupedUp), per row
    up_w = a["up_w"].to(hidden.dtype)
    up = (hg.unsqueeze(-2) * up_w).sum(-1) if use_gemv else torch.einsum("bgk,bgok->bgo", hg, up_w)
    return h + (a["scale"] * (up.flatten(-2) + a["up_b"].to(hidden.dtype))).to(h.dtype)


def _prompt_and_text_softmax(scores: torch.Tensor, prompt: int, front: int, gate: torch.Tensor) -> torch.Tensor:
    """The attention weights [B, G, rep, n] over keys whose first `prompt` are an adaption prompt's and those from
    `front` on the text's (the slots between, for a longer prompt of another layer, weigh nothing): a softmax over
    the prompt's keys times the gate (per row and head, [B|1, H]) and its own over the text's, as the method's two
    attentions have, in the loops of one."""
    B, G, rep, n = scores.shape
    slot = torch.arange(n, device=scores.device)
    in_prompt, in_text = slot < prompt, slot >= front
    top = torch.where(in_prompt, torch.where(in_prompt, scores, -torch.inf).amax(-1, keepdim=True),
                      torch.where(in_text, scores, -torch.inf).amax(-1, keepdim=True))
    e = torch.where(in_prompt | in_text, (scores - top).exp(), 0.0)
    prompt_total = torch.where(in_prompt, e, 0.0).sum(-1, keepdim=True)
    text_total = torch.where(in_text, e, 0.0).sum(-1, keepdim=True)
    gate = gate.float().view(-1, G, rep, 1)
    return e * torch.where(in_prompt, gate / prompt_total, 1.0 / text_total)


def _block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, write_at: torch.Tensor,
           n_heads: int, eps: tuple[float, float], form: str, t: dict[str, Any]) -> torch.Tensor:
    """One decoder block for one token per row: x [B, C] -> [B, C].

    Writes the step's keys/values at position `write_at` (a 1-element long tensor) of the
    layer's caches [B, G, S, d] and attends over their first n positions, masked by the additive
    `bias` [B, 1, 1, n]: n is the graph's one dynamic size (the keys written so far), so one graph serves
    every step and the work follows the sequence, not the cache's rounded-up length. What an adapter
    adds, when `t` holds it: a gated prefix (its keys/values from the prefill and the gate per row),
    routed adapters before attention and the feed-forward network, scales and biases of the linears.
    """
    cache_k, cache_v = t["cache_k"], t["cache_v"]
    B = x.shape[0]
    G, d = cache_k.shape[1], cache_k.shape[3]
    h = _rms(x, t["norm1"], eps[0])
    if "attn_adapter" in t:
        h = _routed_adapter(h, t["attn_adapter"], form)
    q, k, v = _linears(h, t, ("q_proj", "k_proj", "v_proj"), form)
    q, k, v = q.view(B, n_heads, d), k.view(B, G, d), v.view(B, G, d)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    cache_k.index_copy_(2, write_at, k.unsqueeze(2))
    cache_v.index_copy_(2, write_at, v.unsqueeze(2))
    n = bias.shape[-1]
    cache_k, cache_v = cache_k[:, :, :n], cache_v[:, :, :n]
    # Attention of one query per head as multiply-and-sum: inductor fuses it with the softmax.
    qg = q.view(B, G, n_heads // G, 1, d).float()
    scores = (qg * cache_k.float().unsqueeze(2)).sum(-1) * (d ** -0.5) + bias  # [B, G, rep, n]
    if "prompt_in_cache" in t:  # (the prompt's slots, the text's first)
        prompt, front = t["prompt_in_cache"]
        probs = _prompt_and_text_softmax(scores, prompt, front, t["prefix_gate"])
    else:
        probs = scores.softmax(-1)
    out = (probs.unsqueeze(-1) * cache_v.float().unsqueeze(2)).sum(-2).to(x.dtype)  # [B, G, rep, d]
    if "prefix_k" in t:  # the gated prefix: its own softmax over the prompt's keys, times the gate
        pk, pv = t["prefix_k"].float().unsqueeze(2), t["prefix_v"].float().unsqueeze(2)  # [B|1, G, 1, P, d]
        p_scores = (qg * pk).sum(-1) * (d ** -0.5)  # [B, G, rep, P]
        if "prefix_bias" in t:  # rows with shorter prompts than others: -inf past their own [B, 1, 1, P]
            p_scores = p_scores + t["prefix_bias"]
        p_probs = p_scores.softmax(-1).unsqueeze(-1)  # [B, G, rep, P, 1]
        p_out = (p_probs * pv).sum(-2).to(x.dtype)  # [B, G, rep, d]
        out = out + t["prefix_gate"].to(x.dtype).view(-1, G, n_heads // G, 1) * p_out
    x = x + _linear(out.reshape(B, n_heads * d), t, "o_proj", form)
    h = _rms(x, t["norm2"], eps[1])
    if "ffn_adapter" in t:
        h = _routed_adapter(h, t["ffn_adapter"], form)
    gate, up = _linears(h, t, ("gate_proj", "up_proj"), form)
    gate_up = F.silu(gate) * up
    return x + _linear(gate_up, t, "down_proj", form)


def _group_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                write_at: torch.Tensor, n_heads: int, eps: tuple[float, float], form: str, layout: str,
                layers: list[dict[str, Any]]) -> torch.Tensor:
    """A run of consecutive blocks; one graph for a few blocks amortises the per-call overhead. `layout` is
    `layout_of(layers)`: the one guard on their structure (`keep_guard`)."""
    if not layout:  # read, so that dynamo guards on its value
        raise ValueError("no layout")
    for tensors in layers:
        x = _block(x, cos, sin, bias, write_at, n_heads, eps, form, tensors)
    return x


def layout_of(layers: list[dict[str, Any]]) -> str:
    """Everything about the blocks' inputs but their tensors: the keys of each layer's entries and every value
    that is not a tensor (None for a missing bias or scale, a joint weight's sizes, a packed weight's kind)."""
    def describe(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "T"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k!r}:{describe(u)}" for k, u in v.items()) + "}"
        if isinstance(v, (tuple, list)):
            return type(v).__name__ + "(" + ",".join(describe(u) for u in v) + ")"
        if v is None or isinstance(v, (bool, int, float, str)):
            return f"{type(v).__name__}:{v!r}"
        raise TypeError(f"a decode input of type {type(v).__name__} has no layout")
    return describe(layers)


# The guards on the layers' structure that `layout_of` stands for: a value (None, a number, a string), a missing or
# present key, a container's type or length. Any other guard there (on tensors, their aliasing) is kept.
STRUCTURE_GUARDS = frozenset({"CONSTANT_MATCH", "EQUALS_MATCH", "ID_MATCH", "TYPE_MATCH", "DICT_NOT_CONTAINS",
                              "DICT_CONTAINS", "DICT_KEYS_MATCH", "DICT_LENGTH", "SEQUENCE_LENGTH", "LIST_LENGTH",
                              "TUPLE_ITERATOR_LEN"})


def keep_guard(entry: Any) -> bool:
    """Which of dynamo's guards the blocks' graphs keep (the `guard_filter_fn` of torch.compile): all but those on
    the structure of `layers` (`STRUCTURE_GUARDS`, ~35 per block), which the one guard on `layout` (`layout_of`)
    stands for. A cache lookup per group call took 0.34-0.39 ms with them and 0.25-0.32 ms without (SmolLM2, one
    row: about 1.5% of a token; docs/benchmarks.md)."""
    return not (entry.name.startswith("layers") and entry.guard_type in STRUCTURE_GUARDS)


def _keep_guards(entries: list[Any]) -> list[bool]:
    return [keep_guard(e) for e in entries]


def decodes_fast(module: nn.Module) -> bool:
    """Whether a hook module can give the compiled step its decode tensors (`decode_terms`)."""
    return callable(getattr(module, "decode_terms", None))


def _block_tensors(layer: Block, cache: KVCache, i: int, extras: dict[str, Any], rows: int,
                   joint: bool = False) -> dict[str, Any]:
    """The block's weights, biases, caches and adapter terms, as `_block` reads them; with `joint`, the q/k/v and
    gate/up weights as one tensor per group where model/fused.py made one."""
    t: dict[str, Any] = {"cache_k": cache.k[i], "cache_v": cache.v[i], "norm1": layer.input_layernorm.weight,
                         "norm2": layer.post_attention_layernorm.weight}
    for part, names in BLOCK_LINEARS:
        for name in names:
            lin = getattr(getattr(layer, part), name)
            t["w" + name], t["b" + name] = lin.weight, lin.bias
            if isinstance(lin, AdaptableLinear) and lin.quantized is not None:
                t["q" + name] = cast(Any, lin.quantized).terms()
            if isinstance(lin, AdaptableLinear):
                t["db" + name], t["s" + name] = lin.delta_bias, lin.scale
    for part, group in GROUPS if joint else ():
        weights = joint_of([getattr(getattr(layer, part), name) for name in group])
        if weights is not None:
            t["joint_" + group[0]] = (weights.weight, weights.bias, tuple(weights.sizes))
            for name in group:  # the separate views are not read
                del t["w" + name], t["b" + name]
    prefix, adapters = hook_terms(layer, cache, extras, rows)
    if prefix is not None:
        t["prefix_k"], t["prefix_v"], t["prefix_gate"], bias = prefix
        if bias is not None:
            t["prefix_bias"] = bias
    t.update(adapters)
    return t


def prompt_front(model: LlamaLM) -> int:
    """How many slots a cache should reserve ahead of the text (`KVCache.front`) for the compiled step to hold the
    adaption prompts' keys/values there (`_prompts_into_cache`): the longest prompt of the model's layers."""
    return max((getattr(cast(Block, b).self_attn.prefix, "prompt_len", 0) for b in model.layers), default=0)


def _prompts_into_cache(layers: list[dict[str, Any]], cache: KVCache) -> int:
    """Copy every layer's prompt keys/values into the cache's front slots, where the step attends them with the
    text's in one attention (`_prompt_and_text_softmax`) instead of a second one: the latter cost V1 four small
    loop nests per layer (two of them parallel) and three more inputs per layer and call, ~6% of a token (SmolLM2,
    EPYC). Done when
    the cache reserved a front that holds every layer's prompt and no row masks prompt keys (the server's mixed
    batches do); returns the front's length, or 0 where the prompts stay separate inputs."""
    front = cache.front
    if not front or any(t.get("prefix_k") is None or t["prefix_k"].shape[2] > front or "prefix_bias" in t
                        for t in layers):
        return 0
    k_all, v_all = cache.with_front()
    for i, t in enumerate(layers):
        prompt = t["prefix_k"].shape[2]
        k_all[i, :, :, :prompt] = t.pop("prefix_k")
        v_all[i, :, :, :prompt] = t.pop("prefix_v")
        t["cache_k"], t["cache_v"], t["prompt_in_cache"] = k_all[i], v_all[i], (prompt, front)
    return front


def hook_terms(layer: Block, cache: KVCache, extras: dict[str, Any],
               rows: int) -> tuple[tuple | None, dict[str, dict[str, Any]]]:
    """What the block's hooks add to a decode step after the prefill, from their `decode_terms`: the gated prefix's
    keys, values, gates and additive bias over the prompt's keys (None: no bias; the whole None where it adds
    nothing to these rows), and each routed adapter's tensors by slot (where it adds something). Used by the
    compiled step and by the server's mixed batches (serve/merged.py)."""
    attn = layer.self_attn
    prefix = None if attn.prefix is None else cast(Any, attn.prefix).decode_terms(attn, cache, extras)
    adapters = {}
    for slot in ADAPTER_SLOTS:
        hook = getattr(layer, slot)
        terms = None if hook is None else cast(Any, hook).decode_terms(cache, rows, extras)
        if terms is not None:
            adapters[slot] = terms
    return prefix, adapters


def head_terms(model: LlamaLM) -> tuple | None:
    """The packed table of a quantized output head, or None for a float one."""
    table = getattr(model.lm_head, "table", None)
    return None if table is None else table.terms()


def _uniform(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every layer the same entries, so that one graph serves every group of blocks: where a layer
    lacks a term that another has, a neutral one (a prefix with gate 0, an adapter with zero up-projections,
    scale 1, extra bias 0), which adds exactly nothing."""
    def like(name: str) -> Any:
        return next(t[name] for t in layers if t.get(name) is not None)

    out = []
    for t in layers:
        t = dict(t)
        if "prefix_k" not in t and any("prefix_k" in u for u in layers):
            t["prefix_k"], t["prefix_v"] = torch.zeros_like(like("prefix_k")), torch.zeros_like(like("prefix_v"))
            t["prefix_gate"] = torch.zeros_like(like("prefix_gate"))
        if "prefix_bias" not in t and any("prefix_bias" in u for u in layers):
            t["prefix_bias"] = torch.zeros_like(like("prefix_bias"))
        for slot in ADAPTER_SLOTS:
            if slot not in t and any(slot in u for u in layers):
                t[slot] = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                           for k, v in like(slot).items()}
        for name in (n for _, names in BLOCK_LINEARS for n in names):
            if t.get("s" + name) is None and any(u.get("s" + name) is not None for u in layers):
                t["s" + name] = torch.ones_like(like("s" + name))
            if t.get("db" + name) is None and any(u.get("db" + name) is not None for u in layers):
                t["db" + name] = torch.zeros_like(like("db" + name))
        out.append(t)
    return out


# Rows per piece of the output head's reduction: on our 2-core CPU a whole-step A/B decoded
# 8-11% faster with SmolLM2's 49k-row head in 12k-row pieces than in one reduction.
HEAD_ROWS_PER_PIECE = 12288


def _head_step(x: torch.Tensor, norm: torch.Tensor, eps: float, w: torch.Tensor, b: torch.Tensor | None,
               form: str, q: tuple | None = None) -> torch.Tensor:
    """The final norm and the output head: for one row as reductions over the table in pieces (a float table or
    an int8 one: 1.2 ms per token on the EPYC where the int8 kernel took 2.3), else the product of the form or the
    packed table's kernel (model/quantize.py)."""
    h = _rms(x, norm, eps)
    if form != "gemv" or (q is not None and q[0] != "int8"):
        return _packed(h, q) if q is not None else PRODUCTS[form](h, w, b)
    if q is not None:
        pieces = zip(q[1].split(HEAD_ROWS_PER_PIECE), q[2].split(HEAD_ROWS_PER_PIECE))
        return torch.cat([_int8_gemv(h, wp, sp) for wp, sp in pieces], -1)
    rows = w.split(HEAD_ROWS_PER_PIECE)
    biases = b.split(HEAD_ROWS_PER_PIECE) if b is not None else [None] * len(rows)
    return torch.cat([_gemv(h, wp, bp) for wp, bp in zip(rows, biases)], -1)


def why_not_compiled(model: LlamaLM) -> str | None:
    """None when the compiled step computes what the eager forward does for this model, else why not.

    Adapters are fine when each of their hooks gives its decode tensors (`decode_terms`: V1/V2 gated
    prefixes, LaVIN's routed adapters), and the linears' scales and extra biases (an unfolded V2) are
    read directly, and packed low-bit weights go through PyTorch's kernels in the graph (int8 for one row: its
    reductions, `_int8_gemv`); a low-rank update, a
    hook of another kind or a PyTorch module hook keeps the eager path."""
    for i, layer in enumerate(model.layers):
        block = cast(Block, layer)
        hooks = [block.self_attn.prefix, block.attn_adapter, block.ffn_adapter]
        if any(h is not None and not decodes_fast(h) for h in hooks):
            return f"layer {i} has a hook without decode_terms"
    for name, m in model.named_modules():
        if has_module_hooks(m):
            return f"{name or 'the model'} has a PyTorch module hook"
        if isinstance(m, AdaptableLinear) and m.lora is not None:
            return f"{name} has a low-rank update"
    from torch.nn.modules import module as _module  # global hooks registered with register_module_forward_hook

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "a global module hook is registered"
    return None


class CompiledDecode:
    """The compiled decode step of one model, and the checks that decide when it may run."""

    def __init__(self, model: LlamaLM, use_gemv: bool | None = None, background: bool = False,
                 max_rows: int | None = None):
        self.model = model
        self.background = background  # compile in another process while the caller decodes eagerly
        self.max_rows = max_rows  # larger batches decode eagerly
        self.use_gemv = use_gemv  # None: by device and rows (`gemv_for`)
        self.failed: str | None = None
        # One graph for a group of blocks, reused by every group (weights are inputs): compiling
        # stays bounded, and several blocks per call amortise the guards and thread wake-ups
        # (SmolLM2's 30 layers: groups of 10 decode ~10% faster than groups of 6, and compile
        # in ~40 s instead of ~10 s; one graph of all 30 takes two minutes to compile).
        n = model.config.n_layers
        self.group = max(g for g in range(1, min(n, MAX_BLOCKS_PER_GRAPH) + 1) if n % g == 0)
        self._blocks = torch.compile(_group_step, dynamic=False, fullgraph=True,
                                     options={**COMPILE_OPTIONS, "guard_filter_fn": _keep_guards})
        self._head = torch.compile(_head_step, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
        self.compiled_steps = 0
        # per generation: the cache, the per-layer inputs in groups (`group` layers each) with their layouts,
        # (background mode) their shapes and the worker's marker, and the prompts' slots ahead of the text's
        self._tensors: tuple[KVCache, list[tuple[str, list]], tuple | None, Path | None, int] | None = None
        self._ready: set[tuple] = set()  # input shapes with a compiled graph (background mode)
        self._worker: tuple[tuple, subprocess.Popen, IO[bytes]] | None = None  # shapes, process, its stderr

    def gemv_for(self, rows: int) -> bool:
        """Whether the graph's linears are multiply-and-sum reductions for `rows` sequences: on a CPU at few rows,
        where they beat the BLAS matrix-vector kernels in bf16; else the vendor's matrix kernel."""
        if self.use_gemv is not None:
            return self.use_gemv
        return self.model.device.type == "cpu" and rows <= GEMV_MAX_ROWS

    def form_for(self, rows: int) -> str:
        """The step's form for `rows` sequences (`PRODUCTS`): reductions (`gemv_for`), else the weight as the left
        operand up to WEIGHT_LEFT_MAX_ROWS rows on a CPU with AMX, else F.linear."""
        if self.gemv_for(rows):
            return "gemv"
        weight_left = self.model.device.type == "cpu" and cpu_has_amx() and rows <= WEIGHT_LEFT_MAX_ROWS
        return "weight_left" if weight_left else "matrix"

    def usable(self, cache_len: int, rows: int = 1) -> bool:
        """Whether the graph computes what the eager model would for `rows` sequences and a cache of `cache_len`
        (and, for the default step, whether it is faster there: batches of up to 64 rows)."""
        m = self.model
        if self.failed is not None or torch.is_grad_enabled():
            return False
        if self.max_rows is not None and rows > self.max_rows:
            return False
        window = m.config.sliding_window
        if window is not None and cache_len > window:
            return False
        return why_not_compiled(m) is None

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_valid: torch.Tensor, extras: dict[str, Any] | None = None) -> torch.Tensor | None:
        """Logits [B, V] for `token` [B] at `positions` [B], after the prefill filled `cache` (and the
        adapters' per-generation state in it) with the method inputs `extras`; None when this step must run
        eagerly (compiling failed, or, in background mode, the graph for these shapes is not ready yet)."""
        keys = cache.length + 1  # the keys this step attends: those written so far and its own
        if self.failed is not None:
            return None
        if keys >= cache.max_len:  # all of the cache: a size the graph would specialise on (one eager step)
            return None
        m = self.model
        cos_table, sin_table = m.rotary.table(cache.max_len, token.device)  # no device sync for the max
        cos, sin = cos_table[positions, None].to(m.dtype), sin_table[positions, None].to(m.dtype)  # [B, 1, d]
        x = m.embed_tokens(token)  # a float table, or a quantized one (model/quantize.py)
        rows = token.shape[0]
        form = self.form_for(rows)
        dynamic_batch = form != "gemv" and rows > 1  # the matrix forms: one graph for every batch size
        if dynamic_batch:
            for t in (x, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if self._tensors is None or self._tensors[0] is not cache:
            tensors = _uniform([_block_tensors(cast(Block, b), cache, i, extras or {}, rows, joint=form != "gemv")
                                for i, b in enumerate(m.layers)])
            front = _prompts_into_cache(tensors, cache)
            _mark_dynamic(tensors, rows if dynamic_batch else None)
            shapes = _shapes(x, tensors) if self.background else None
            marker = compile_worker.marker(repr((shapes, form, self.group))) if self.background else None
            chunks = [tensors[g:g + self.group] for g in range(0, len(tensors), self.group)]
            self._tensors = (cache, [(layout_of(c), c) for c in chunks], shapes, marker, front)
        _, groups, shapes, marker, front = self._tensors  # front: the prompts' slots, ahead of the text's
        write_at = torch.tensor([front + cache.length], device=token.device)
        bias = torch.zeros((rows, front + keys), dtype=torch.float32, device=token.device)
        bias[:, front:].masked_fill_(~key_valid[:, :keys], torch.finfo(torch.float32).min)
        bias = bias[:, None, None, :]
        torch._dynamo.mark_dynamic(bias, 3)
        if dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(bias, 0)
        if shapes is not None and marker is not None and shapes not in self._ready:
            if not self._compiled_elsewhere(shapes, marker, (x, cos, sin, bias, write_at), groups[0], form):
                return None
            self._ready.add(shapes)  # the call below compiles from the worker's cache entries
        try:
            logits = self._run(x, cos, sin, bias, write_at, groups, form)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back to eager
            self._fail(e)
            return None
        cache.length += 1
        self.compiled_steps += 1
        return logits

    def _block_args(self, form: str) -> tuple[int, tuple[float, float], str]:
        """The arguments of `_group_step` after the step's tensors and before the layers'."""
        m = self.model
        first = cast(Block, m.layers[0])
        return m.config.n_heads, (first.input_layernorm.eps, first.post_attention_layernorm.eps), form

    def _head_args(self, form: str) -> tuple:
        """The arguments of `_head_step` after the hidden state."""
        m = self.model
        return m.norm.weight, m.norm.eps, m.lm_head.weight, m.lm_head.bias, form, head_terms(m)

    def _run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
             write_at: torch.Tensor, groups: list[tuple[str, list[dict[str, Any]]]], form: str) -> torch.Tensor:
        # Every model, batch size, cache length and adapter layout is a graph of the same two functions, and
        # dynamo's default limit of 8 graphs per function is soon reached by a process holding several
        # (a server, a test run): the limit is raised for these calls only.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for layout, layers in groups:
                x = self._blocks(x, cos, sin, bias, write_at, *self._block_args(form), layout, layers)
            return self._head(x, *self._head_args(form))

    def _fail(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"compiled decoding failed, using the eager path: {self.failed}", stacklevel=3)

    def _compiled_elsewhere(self, shapes: tuple, marker: Path, inputs: tuple,
                            group: tuple[str, list[dict[str, Any]]], form: str) -> bool:
        """Whether a worker process has compiled the graphs for these shapes into inductor's on-disk cache (in
        this process or an earlier one: it leaves a marker there); starts one (one at a time) if none is running
        (model/compile_worker.py says why a process)."""
        if marker.exists():
            return True
        if self._worker is None:
            calls = {"_group_step": (*inputs, *self._block_args(form), *group),
                     "_head_step": (inputs[0], *self._head_args(form))}
            try:
                job = compile_worker.spec(calls, torch.get_num_threads(), marker)
                log: IO[bytes] = tempfile.TemporaryFile()
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # finds what we found
                proc = subprocess.Popen(WORKER, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, env=env)
                cast(IO[bytes], proc.stdin).write(job)
                cast(IO[bytes], proc.stdin).close()
            except (OSError, ValueError) as e:
                self._fail(e)
                return False
            self._worker = (shapes, proc, log)
        done, proc, log = self._worker
        if proc.poll() is None:
            return False
        self._worker = None
        with log:
            if proc.returncode != 0:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                self._fail(RuntimeError(lines[-1] if lines else f"the compile worker exited with {proc.returncode}"))
                return False
        return done == shapes or marker.exists()  # else it compiled another generation's shapes: ours next

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background compile to finish; True when none is running any more."""
        if self._worker is not None:
            try:
                self._worker[1].wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        return True

    def __deepcopy__(self, memo: dict) -> _CopiedChoice:
        """A copied model gets a step of its own, made when first asked for (worker processes and compiled
        wrappers are not copied, and the copy is not built yet while its attributes are being copied)."""
        return _CopiedChoice(self.use_gemv, self.background, self.max_rows)


@dataclass(frozen=True)
class _CopiedChoice:
    """What a deep copy of a model keeps of its compiled step: the choices, not the state."""

    use_gemv: bool | None
    background: bool
    max_rows: int | None


# When the routed adapters' `decode_terms` hold a tensor per row (dim 0 = batch): by its rank. The up-projections
# mixed by each row's routing weights always are; the down-projection is the adapter's own weight ([R, C], [R]:
# its first size may equal the batch's by chance) except in a mixed server batch (serve/merged.py).
ADAPTER_ROW_RANKS = {"up_w": 4, "up_b": 2, "down_w": 3, "down_b": 2}


def _mark_dynamic(tensors: list[dict[str, Any]], rows: int | None) -> None:
    """Mark the sizes the graph need not specialise on as dynamic: the caches' length (one graph for every cache,
    la.generate's rounded-up ones and the server's buffer widths alike), and with `rows` (the matrix form) the
    batch dimension of every per-row input of the blocks: the caches, the prompts' keys/values, gates and bias
    held per row ([1, ...] when shared), the routed adapters' per-row projections."""
    for t in tensors:
        for cache in (t["cache_k"], t["cache_v"]):
            torch._dynamo.maybe_mark_dynamic(cache, 2)
    if rows is None:
        return
    prompt = ("prefix_k", "prefix_v", "prefix_gate", "prefix_bias")
    for t in tensors:
        per_row = [t["cache_k"], t["cache_v"], *(t[k] for k in prompt if k in t)]
        per_row += [v for slot in ADAPTER_SLOTS if slot in t for k, v in t[slot].items()
                    if isinstance(v, torch.Tensor) and v.dim() == ADAPTER_ROW_RANKS.get(k)]
        for v in per_row:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(v, 0)


def _shapes(x: torch.Tensor, tensors: list[dict[str, Any]]) -> tuple:
    """What the graphs are specialised on: the shapes (None for a size marked dynamic) and dtypes of every input
    (one entry per distinct layer), so that a graph compiled for one generation is known to serve another."""
    def describe(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            dynamic = compile_worker.dynamic_dims(v)
            return tuple(None if i in dynamic else n for i, n in enumerate(v.shape)), v.dtype, v.device.type
        if isinstance(v, dict):
            return tuple(sorted((k, describe(u)) for k, u in v.items()))
        if isinstance(v, (tuple, list)):
            return tuple(describe(u) for u in v)
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
    return describe(x), tuple(dict.fromkeys(describe(t) for t in tensors))


def enable_compiled_decode(model: LlamaLM, use_gemv: bool | None = None) -> CompiledDecode:
    """Decode through the compiled graph, compiling on the first step and waiting for it (benchmarks, or a
    server that would rather wait once than decode eagerly at first)."""
    state = CompiledDecode(model, use_gemv)
    setattr(model, _ATTR, state)
    return state


def disable_compiled_decode(model: LlamaLM) -> None:
    """Keep this model on the eager path, the default included."""
    setattr(model, _ATTR, None)


def compiled_decode_of(model: LlamaLM) -> CompiledDecode | None:
    """The model's compiled step, if one was enabled or made by default."""
    state = getattr(model, _ATTR, None)
    if isinstance(state, _CopiedChoice):  # a deep copy of a model that had one
        state = CompiledDecode(model, state.use_gemv, state.background, state.max_rows)
        setattr(model, _ATTR, state)
    return state


def fast_by_default(model: LlamaLM) -> bool:
    """Where the compiled step is the default: on a CPU, where it was measured faster (docs/benchmarks.md),
    unless LLAMA_ADAPTER_FAST_DECODE=0. Elsewhere it is opt-in until measured there."""
    return switched_on(ENV_SWITCH) and model.device.type == "cpu"


def default_decode(model: LlamaLM) -> CompiledDecode | None:
    """The decode step `generate` uses: the one enabled (or disabled) for this model, else by default a
    background-compiled one where `fast_by_default`."""
    if hasattr(model, _ATTR):
        return compiled_decode_of(model)
    if not fast_by_default(model):
        return None
    state = CompiledDecode(model, background=True, max_rows=DEFAULT_MAX_ROWS)
    setattr(model, _ATTR, state)
    return state

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
without a term that others have get a neutral one (gate 0, routing weights 0, scale 1), which adds
exactly nothing, so one graph serves every group of blocks.

The graph is used only while it computes exactly what the eager model computes
(`why_not_compiled`): no low-rank update or quantized weight on a linear, no hook without
`decode_terms`, no PyTorch module hooks, no gradient recording, and no sliding window the
step could exceed. Anything else takes the eager path, so attaching anything after enabling
is safe. Compilation happens on the first decode step (tens of seconds on a CPU; later
processes reuse inductor's on-disk cache); a failure to compile disables the fast path for
that model with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attached import method_is_plain
from .fused import has_module_hooks
from .llama import BLOCK_LINEARS, AdaptableLinear, Block, KVCache, LlamaLM

_ATTR = "_compiled_decode"
MAX_BLOCKS_PER_GRAPH = 10
RECOMPILE_LIMIT = 256  # graphs per compiled function in one process (dynamo's default: 8)


def _gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear written as multiply-and-sum so that inductor emits a streaming reduction.

    Only for use inside a compiled graph: run eagerly it would materialise [B, N, K].
    Accumulates in fp32 like the eager bf16 kernels do, then rounds to the input dtype.
    """
    y = (x.float().unsqueeze(-2) * w.float()).sum(-1)
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return w * normed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _linear(h: torch.Tensor, t: dict[str, Any], name: str, use_gemv: bool) -> torch.Tensor:
    """The block's linear `name` with its optional extra bias and scale (an unfolded V2):
    scale * (W h + b + delta_bias), as AdaptableLinear computes it."""
    y = (_gemv if use_gemv else F.linear)(h, t["w" + name], t["b" + name])
    if t.get("db" + name) is not None:
        y = y + t["db" + name]
    if t.get("s" + name) is not None:
        y = y * t["s" + name]
    return y


def _routed_adapter(h: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    """LaVIN's MM-adapter with its routing weights fixed at prefill: h + s (w0 U0(D h) + w1 U1(D h))."""
    hidden = F.linear(h.to(a["down_w"].dtype), a["down_w"], a["down_b"])
    hg = hidden.unflatten(-1, (a["up0_w"].shape[0], -1))  # grouped up-projections (GroupedUp)

    def up(i: int) -> torch.Tensor:
        w, b = a[f"up{i}_w"].to(hidden.dtype), a[f"up{i}_b"].to(hidden.dtype)
        return torch.einsum("bgk,gok->bgo", hg, w).flatten(-2) + b

    w = a["weights"].to(hidden.dtype)
    return h + (a["scale"] * (w[:, 0:1] * up(0) + w[:, 1:2] * up(1))).to(h.dtype)


def _block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, write_at: torch.Tensor,
           n_heads: int, eps: tuple[float, float], use_gemv: bool, t: dict[str, Any]) -> torch.Tensor:
    """One decoder block for one token per row: x [B, C] -> [B, C].

    Writes the step's keys/values at position `write_at` (a 1-element long tensor) of the
    layer's caches [B, G, S, d] and attends over all S positions, masked by the additive
    `bias` [B, 1, 1, S], so every shape is fixed and one graph serves every step. What an adapter
    adds, when `t` holds it: a gated prefix (its keys/values from the prefill and the gate per row),
    routed adapters before attention and the feed-forward network, scales and biases of the linears.
    """
    cache_k, cache_v = t["cache_k"], t["cache_v"]
    B = x.shape[0]
    G, d = cache_k.shape[1], cache_k.shape[3]
    h = _rms(x, t["norm1"], eps[0])
    if "attn_adapter" in t:
        h = _routed_adapter(h, t["attn_adapter"])
    q = _linear(h, t, "q_proj", use_gemv).view(B, n_heads, d)
    k = _linear(h, t, "k_proj", use_gemv).view(B, G, d)
    v = _linear(h, t, "v_proj", use_gemv).view(B, G, d)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    cache_k.index_copy_(2, write_at, k.unsqueeze(2))
    cache_v.index_copy_(2, write_at, v.unsqueeze(2))
    # Attention of one query per head as multiply-and-sum: inductor fuses it with the softmax.
    qg = q.view(B, G, n_heads // G, 1, d).float()
    scores = (qg * cache_k.float().unsqueeze(2)).sum(-1) * (d ** -0.5) + bias  # [B, G, rep, S]
    probs = scores.softmax(-1).unsqueeze(-1)  # [B, G, rep, S, 1]
    out = (probs * cache_v.float().unsqueeze(2)).sum(-2).to(x.dtype)  # [B, G, rep, d]
    if "prefix_k" in t:  # the gated prefix: its own softmax over the prompt's keys, times the gate
        pk, pv = t["prefix_k"].float().unsqueeze(2), t["prefix_v"].float().unsqueeze(2)  # [B|1, G, 1, P, d]
        p_probs = ((qg * pk).sum(-1) * (d ** -0.5)).softmax(-1).unsqueeze(-1)  # [B, G, rep, P, 1]
        p_out = (p_probs * pv).sum(-2).to(x.dtype)  # [B, G, rep, d]
        out = out + t["prefix_gate"].to(x.dtype).view(-1, G, n_heads // G, 1) * p_out
    x = x + _linear(out.reshape(B, n_heads * d), t, "o_proj", use_gemv)
    h = _rms(x, t["norm2"], eps[1])
    if "ffn_adapter" in t:
        h = _routed_adapter(h, t["ffn_adapter"])
    gate_up = F.silu(_linear(h, t, "gate_proj", use_gemv)) * _linear(h, t, "up_proj", use_gemv)
    return x + _linear(gate_up, t, "down_proj", use_gemv)


def _group_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                write_at: torch.Tensor, n_heads: int, eps: tuple[float, float], use_gemv: bool,
                layers: list[dict[str, Any]]) -> torch.Tensor:
    """A run of consecutive blocks; one graph for a few blocks amortises the per-call overhead."""
    for tensors in layers:
        x = _block(x, cos, sin, bias, write_at, n_heads, eps, use_gemv, tensors)
    return x


def decodes_fast(module: nn.Module) -> bool:
    """Whether a hook module can give the compiled step its decode tensors (`decode_terms`)."""
    return callable(getattr(module, "decode_terms", None))


def _block_tensors(layer: Block, cache: KVCache, i: int, extras: dict[str, Any], rows: int) -> dict[str, Any]:
    """The block's weights, biases, caches and adapter terms, as `_block` reads them."""
    t: dict[str, Any] = {"cache_k": cache.k[i], "cache_v": cache.v[i], "norm1": layer.input_layernorm.weight,
                         "norm2": layer.post_attention_layernorm.weight}
    for part, names in BLOCK_LINEARS:
        for name in names:
            lin = getattr(getattr(layer, part), name)
            t["w" + name], t["b" + name] = lin.weight, lin.bias
            if isinstance(lin, AdaptableLinear):
                t["db" + name], t["s" + name] = lin.delta_bias, lin.scale
    attn = layer.self_attn
    if attn.prefix is not None:
        terms = cast(Any, attn.prefix).decode_terms(attn, cache, extras)
        if terms is not None:
            t["prefix_k"], t["prefix_v"], t["prefix_gate"] = terms
    for slot in ("attn_adapter", "ffn_adapter"):
        adapter = getattr(layer, slot)
        if adapter is not None:
            t[slot] = cast(Any, adapter).decode_terms(cache, rows)
    return t


def _uniform(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every layer the same entries, so that one graph serves every group of blocks: where a layer
    lacks a term that another has, a neutral one (a prefix with gate 0, an adapter with routing weights 0,
    scale 1, extra bias 0), which adds exactly nothing."""
    def like(name: str) -> Any:
        return next(t[name] for t in layers if t.get(name) is not None)

    out = []
    for t in layers:
        t = dict(t)
        if "prefix_k" not in t and any("prefix_k" in u for u in layers):
            t["prefix_k"], t["prefix_v"] = torch.zeros_like(like("prefix_k")), torch.zeros_like(like("prefix_v"))
            t["prefix_gate"] = torch.zeros_like(like("prefix_gate"))
        for slot in ("attn_adapter", "ffn_adapter"):
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
               use_gemv: bool) -> torch.Tensor:
    h = _rms(x, norm, eps)
    if not use_gemv:
        return F.linear(h, w, b)
    pieces = w.split(HEAD_ROWS_PER_PIECE)
    biases = b.split(HEAD_ROWS_PER_PIECE) if b is not None else [None] * len(pieces)
    return torch.cat([_gemv(h, wp, bp) for wp, bp in zip(pieces, biases)], -1)


def is_plain(model: LlamaLM) -> bool:
    """True when the eager forward is exactly the bare LLaMA computation (no hook of any kind).

    The attached method answers for itself (`plain`, model/attached.py); the model's own hook slots
    and PyTorch's module hooks are checked too, for modules put there without a method."""
    if not method_is_plain(model):
        return False
    for layer in model.layers:
        if layer.attn_adapter is not None or layer.ffn_adapter is not None or layer.self_attn.prefix is not None:
            return False
    for m in model.modules():
        if has_module_hooks(m):
            return False
        if isinstance(m, AdaptableLinear) and not m.plain:
            return False
    from torch.nn.modules import module as _module  # global hooks registered with register_module_forward_hook

    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks)


def why_not_compiled(model: LlamaLM) -> str | None:
    """None when the compiled step computes what the eager forward does for this model, else why not.

    Adapters are fine when each of their hooks gives its decode tensors (`decode_terms`: V1/V2 gated
    prefixes, LaVIN's routed adapters), and the linears' scales and extra biases (an unfolded V2) are
    read directly; a low-rank update, a quantized weight, a hook of another kind or a PyTorch module hook
    keeps the eager path."""
    for i, layer in enumerate(model.layers):
        block = cast(Block, layer)
        hooks = [block.self_attn.prefix, block.attn_adapter, block.ffn_adapter]
        if any(h is not None and not decodes_fast(h) for h in hooks):
            return f"layer {i} has a hook without decode_terms"
    for name, m in model.named_modules():
        if has_module_hooks(m):
            return f"{name or 'the model'} has a PyTorch module hook"
        if isinstance(m, AdaptableLinear) and (m.lora is not None or m.quantized is not None):
            return f"{name} has a low-rank update or a quantized weight"
    from torch.nn.modules import module as _module  # global hooks registered with register_module_forward_hook

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return "a global module hook is registered"
    return None


class CompiledDecode:
    """The compiled decode step of one model, and the checks that decide when it may run."""

    def __init__(self, model: LlamaLM, use_gemv: bool | None = None):
        self.model = model
        dev = model.device
        # CPU: the explicit reduction beats the BLAS GEMV in bf16; elsewhere keep the vendor GEMM.
        self.use_gemv = (dev.type == "cpu") if use_gemv is None else use_gemv
        self.failed: str | None = None
        # One graph for a group of blocks, reused by every group (weights are inputs): compiling
        # stays bounded, and several blocks per call amortise the guards and thread wake-ups
        # (SmolLM2's 30 layers: groups of 10 decode ~10% faster than groups of 6, and compile
        # in ~40 s instead of ~10 s; one graph of all 30 takes two minutes to compile).
        n = model.config.n_layers
        self.group = max(g for g in range(1, min(n, MAX_BLOCKS_PER_GRAPH) + 1) if n % g == 0)
        self._blocks = torch.compile(_group_step, dynamic=False, fullgraph=True)
        self._head = torch.compile(_head_step, dynamic=False, fullgraph=True)
        self.compiled_steps = 0
        self._tensors: tuple[KVCache, list] | None = None  # per-layer inputs, built once per generation

    def usable(self, cache_len: int) -> bool:
        """Whether the graph computes what the eager model would for a cache of `cache_len`."""
        m = self.model
        if self.failed is not None or torch.is_grad_enabled():
            return False
        window = m.config.sliding_window
        if window is not None and cache_len > window:
            return False
        return why_not_compiled(m) is None

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_valid: torch.Tensor, extras: dict[str, Any] | None = None) -> torch.Tensor | None:
        """Logits [B, V] for `token` [B] at `positions` [B], after the prefill filled `cache` (and the
        adapters' per-generation state in it) with the method inputs `extras`; None if compiling failed
        (then use eager)."""
        m = self.model
        cos_table, sin_table = m.rotary.table(cache.max_len, token.device)  # no device sync for the max
        cos, sin = cos_table[positions, None].to(m.dtype), sin_table[positions, None].to(m.dtype)  # [B, 1, d]
        write_at = torch.tensor([cache.length], device=token.device)
        bias = torch.zeros(key_valid.shape, dtype=torch.float32, device=token.device)
        bias = bias.masked_fill_(~key_valid, torch.finfo(torch.float32).min)[:, None, None, :]
        try:
            x = F.embedding(token, m.embed_tokens.weight)
            if self._tensors is None or self._tensors[0] is not cache:
                blocks = [cast(Block, layer) for layer in m.layers]
                rows = token.shape[0]
                self._tensors = (cache, _uniform([_block_tensors(b, cache, i, extras or {}, rows)
                                                  for i, b in enumerate(blocks)]))
            tensors = self._tensors[1]
            first = cast(Block, m.layers[0])
            eps = (first.input_layernorm.eps, first.post_attention_layernorm.eps)
            # Every model, batch size, cache length and adapter layout is a graph of the same two functions, and
            # dynamo's default limit of 8 graphs per function is soon reached by a process holding several
            # (a server, a test run): the limit is raised for these calls only.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                for g in range(0, len(tensors), self.group):
                    x = self._blocks(x, cos, sin, bias, write_at, m.config.n_heads, eps, self.use_gemv,
                                     tensors[g:g + self.group])
                logits = self._head(x, m.norm.weight, m.norm.eps, m.lm_head.weight, m.lm_head.bias,
                                    self.use_gemv)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back to eager
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"compiled decoding failed, using the eager path: {self.failed}", stacklevel=2)
            return None
        cache.length += 1
        self.compiled_steps += 1
        return logits


def enable_compiled_decode(model: LlamaLM, use_gemv: bool | None = None) -> CompiledDecode:
    """Opt in: let `generate_tokens` decode through a compiled graph when the model is plain."""
    state = CompiledDecode(model, use_gemv)
    setattr(model, _ATTR, state)
    return state


def disable_compiled_decode(model: LlamaLM) -> None:
    """Opt out again: decoding takes the eager path."""
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)


def compiled_decode_of(model: LlamaLM) -> CompiledDecode | None:
    return getattr(model, _ATTR, None)

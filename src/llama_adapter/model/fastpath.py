"""Inference-only fast paths for single-token decoding (opt-in, with a clean fallback).

`enable_compiled_decode(model)` marks a model so that `generate_tokens` runs each decode step
(one new token per row, after an eager prefill) through one `torch.compile`d graph of the
whole model. Why: at batch 1 every linear is a matrix-vector product and the step is bound
by reading the weights; eager PyTorch's bf16 GEMV reaches only a third of the memory
bandwidth on a CPU, and the ~500 small eager ops per step add milliseconds of dispatch.
Inductor turns the explicit multiply-and-reduce below into vectorised, parallel loops that
stream the weights near the bandwidth bound, and fuses the elementwise work in between.

The graph is used only while it computes exactly what the eager model computes: a plain
model (no adapter hooks, no LoRA/scale/delta_bias on any linear, no PyTorch module hooks),
no gradient recording, and no sliding window the step could exceed. Anything else takes the
eager path, so attaching an adapter after enabling is always safe. Compilation happens on
the first decode step (tens of seconds on a CPU; later processes reuse inductor's on-disk
cache); a failure to compile disables the fast path for that model with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F

from .attached import method_is_plain
from .fused import has_module_hooks
from .llama import AdaptableLinear, Block, KVCache, LlamaLM

_ATTR = "_compiled_decode"
MAX_BLOCKS_PER_GRAPH = 10


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


def _block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, write_at: torch.Tensor,
           n_heads: int, eps: tuple[float, float], use_gemv: bool, cache_k: torch.Tensor, cache_v: torch.Tensor,
           norm1: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
           bq: torch.Tensor | None, bk: torch.Tensor | None, bv: torch.Tensor | None, bo: torch.Tensor | None,
           norm2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
           bg: torch.Tensor | None, bu: torch.Tensor | None, bd: torch.Tensor | None) -> torch.Tensor:
    """One decoder block for one token per row: x [B, C] -> [B, C].

    Writes the step's keys/values at position `write_at` (a 1-element long tensor) of the
    layer's caches [B, G, S, d] and attends over all S positions, masked by the additive
    `bias` [B, 1, 1, S], so every shape is fixed and one graph serves every step.
    """
    lin = _gemv if use_gemv else F.linear
    B = x.shape[0]
    G, d = cache_k.shape[1], cache_k.shape[3]
    h = _rms(x, norm1, eps[0])
    q = lin(h, wq, bq).view(B, n_heads, d)
    k = lin(h, wk, bk).view(B, G, d)
    v = lin(h, wv, bv).view(B, G, d)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    cache_k.index_copy_(2, write_at, k.unsqueeze(2))
    cache_v.index_copy_(2, write_at, v.unsqueeze(2))
    # Attention of one query per head as multiply-and-sum: inductor fuses it with the softmax.
    qg = q.view(B, G, n_heads // G, 1, d).float()
    scores = (qg * cache_k.float().unsqueeze(2)).sum(-1) * (d ** -0.5) + bias  # [B, G, rep, S]
    probs = scores.softmax(-1).unsqueeze(-1)  # [B, G, rep, S, 1]
    out = (probs * cache_v.float().unsqueeze(2)).sum(-2).to(x.dtype).reshape(B, n_heads * d)
    x = x + lin(out, wo, bo)
    h = _rms(x, norm2, eps[1])
    return x + lin(F.silu(lin(h, wg, bg)) * lin(h, wu, bu), wd, bd)


def _group_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                write_at: torch.Tensor, n_heads: int, eps: tuple[float, float], use_gemv: bool,
                layers: list[tuple[Any, ...]]) -> torch.Tensor:
    """A run of consecutive blocks; one graph for a few blocks amortises the per-call overhead."""
    for tensors in layers:
        x = _block(x, cos, sin, bias, write_at, n_heads, eps, use_gemv, *tensors)
    return x


def _block_tensors(layer: Block, cache: KVCache, i: int) -> tuple[Any, ...]:
    """The block's weights and biases (None where it has none) and caches, in `_block`'s order."""
    a, f = layer.self_attn, layer.mlp
    return (cache.k[i], cache.v[i], layer.input_layernorm.weight,
            a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            a.q_proj.bias, a.k_proj.bias, a.v_proj.bias, a.o_proj.bias,
            layer.post_attention_layernorm.weight, f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight,
            f.gate_proj.bias, f.up_proj.bias, f.down_proj.bias)


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

    def usable(self, batch_extras: dict[str, Any], cache_len: int) -> bool:
        """Whether the graph computes what the eager model would for a cache of `cache_len`."""
        m = self.model
        if self.failed is not None or torch.is_grad_enabled() or batch_extras:
            return False
        window = m.config.sliding_window
        if window is not None and cache_len > window:
            return False
        return is_plain(m)

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_valid: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V] for `token` [B] at `positions` [B]; None if compiling failed (then use eager)."""
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
                self._tensors = (cache, [_block_tensors(b, cache, i) for i, b in enumerate(blocks)])
            tensors = self._tensors[1]
            first = cast(Block, m.layers[0])
            eps = (first.input_layernorm.eps, first.post_attention_layernorm.eps)
            for g in range(0, len(tensors), self.group):
                x = self._blocks(x, cos, sin, bias, write_at, m.config.n_heads, eps, self.use_gemv,
                                 tensors[g:g + self.group])
            logits = self._head(x, m.norm.weight, m.norm.eps, m.lm_head.weight, m.lm_head.bias, self.use_gemv)
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

"""A compact LLaMA-family decoder with explicit hooks for adapters.

Module names follow the Hugging Face layout (``layers.{i}.self_attn.q_proj`` ...) so that
checkpoints load by stripping the ``model.`` prefix. Hooks, all ``None`` on a plain model:

- ``Attention.prefix``: a gated prefix (adaption prompt); called with the layer's attention
  module and the rotated queries, returns a term added to the attention output.
- ``Block.attn_adapter`` / ``Block.ffn_adapter``: a module applied to the normalised hidden
  state before attention / the feed-forward network.
- ``AdaptableLinear``: every linear carries optional ``scale``, ``delta_bias`` and ``lora``.

Methods that insert tokens (visual, modality) build ``inputs_embeds`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import causal_attention
from .config import ModelConfig
from .fused import project
from .rope import Rotary, apply_rotary

# Every block's linears, by parent module: what code that walks a block's projections iterates over.
BLOCK_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                 ("mlp", ("gate_proj", "up_proj", "down_proj")))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does; bf16 variance loses too much.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


class AdaptableLinear(nn.Linear):
    """nn.Linear with optional per-output-channel scale, extra bias and a low-rank update.

    y = scale * (W x + bias + delta_bias + lora(x)); each term is skipped when None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kw: Any):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.scale: nn.Parameter | None = None
        self.delta_bias: nn.Parameter | None = None
        self.lora: nn.Module | None = None
        # a packed low-bit weight that replaces `weight` (an empty placeholder then): model/quantize.py
        self.quantized: nn.Module | None = None

    @property
    def adapted(self) -> bool:
        """An adapter changes this linear (a scale, an extra bias or a low-rank update)."""
        return self.scale is not None or self.delta_bias is not None or self.lora is not None

    @property
    def plain(self) -> bool:
        """No scale, extra bias, low-rank update or quantized weight: exactly the frozen nn.Linear."""
        return not self.adapted and self.quantized is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x, self.bias)
        if self.lora is not None:
            y = y + self.lora(x)
        if self.delta_bias is not None:
            y = y + self.delta_bias
        if self.scale is not None:
            y = y * self.scale
        return y


@dataclass
class ForwardContext:
    """Per-call state that hooks read: the cache and method-specific per-example inputs (every tensor
    in `extras` is per row, dim 0 = batch, so that `select_extras` can repeat rows)."""

    batch_size: int
    cache: KVCache | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class KVCache:
    """Preallocated keys/values for all layers, plus per-layer prefix keys/values.

    `front` reserves slots ahead of position 0 in the same buffers, where the compiled decode step puts the
    adaption prompts' keys/values so that one attention covers them and the text (model/fastpath.py); `k` and
    `v`, what everything else reads and writes, start after them."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, front: int = 0):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, front + max_len, cfg.head_dim)
        self.front = front
        self._with_front = (torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device))
        self.k, self.v = (t[:, :, :, front:] for t in self._with_front)
        self.max_len = max_len
        self.length = 0
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # per-generation values that hooks compute at prefill and reuse while decoding (e.g. routing)
        self.state: dict[Any, torch.Tensor] = {}

    def with_front(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers [L, B, G, front + max_len, d], front slots included."""
        return self._with_front if self.front else (self.k, self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @classmethod
    def hook_state(cls, length: int, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]],
                   state: dict[Any, torch.Tensor]) -> KVCache:
        """A cache with no keys/values of its own: what hooks read (prompt keys/values, routing, a
        length > 0 meaning a decode step) for rows whose keys/values live in another buffer (serve/engine.py)."""
        out = cls.__new__(cls)
        out.k = out.v = torch.empty(0)
        out.front = 0
        out.max_len, out.length, out.prefix, out.state = length, length, prefix, state
        return out

    def select_rows(self, index: torch.Tensor) -> KVCache:
        """A cache whose row i is row index[i] of this one (several continuations of one prompt)."""
        out = KVCache.__new__(KVCache)
        out.max_len, out.length, out.front = self.max_len, self.length, self.front
        out._with_front = tuple(t.index_select(1, index) for t in self.with_front())  # type: ignore[assignment]
        out.k, out.v = (t[:, :, :, self.front:] for t in out._with_front)
        # prompt keys/values shared by all rows ([1, ...]) stay shared
        out.prefix = {layer: tuple(t if t.shape[0] == 1 else t[index] for t in kv)  # type: ignore[misc]
                      for layer, kv in self.prefix.items()}
        out.state = {key: t[index] for key, t in self.state.items()}
        return out


def select_extras(extras: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """The method inputs of rows `index` (ForwardContext's convention: tensors are per row)."""
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in extras.items()}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = AdaptableLinear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = AdaptableLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = AdaptableLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = AdaptableLinear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.prefix: nn.Module | None = None

    def _heads(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        """[B, T, n_heads * d] -> [B, n_heads, T, d]."""
        return t.view(*t.shape[:2], n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, G, T, d] of `x` [B, T, C], without rotary (for prompts)."""
        return self._heads(self.k_proj(x), self.n_kv_heads), self._heads(self.v_proj(x), self.n_kv_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x)
        q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        if is_causal and mask is None:
            out = causal_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
            )
        if self.prefix is not None:
            out = out + self.prefix(self, q, ctx)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = AdaptableLinear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = AdaptableLinear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = AdaptableLinear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project((self.gate_proj, self.up_proj), x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.attn_adapter: nn.Module | None = None
        self.ffn_adapter: nn.Module | None = None
        self.checkpointed = False  # activation checkpointing: keep only the input, recompute in backward

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, ctx: ForwardContext) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled() and ctx.cache is None:
            # inside the block's own call, so that a sharding wrapper's hooks around the block fire once
            return checkpoint(self._forward, x, cos, sin, mask, is_causal, ctx, use_reentrant=False)
        return self._forward(x, cos, sin, mask, is_causal, ctx)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, is_causal: bool, ctx: ForwardContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, ctx)
        x = x + self.self_attn(h, cos, sin, mask, is_causal, ctx)
        h = self.post_attention_layernorm(x)
        if self.ffn_adapter is not None:
            h = self.ffn_adapter(h, ctx)
        return x + self.mlp(h)


def attention_mask_for(attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
                       window: int | None, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Return (boolean mask [B, 1, T, S] or None, is_causal) for SDPA.

    `attention_mask` [B, past + T] marks keys that may be attended (0: padding, or a token
    no other token may see). Each query always sees itself, so no row is empty.
    """
    total = past + q_len
    needs_window = window is not None and total > window
    if attention_mask is None and not needs_window:
        if past == 0:
            return None, q_len > 1
        if q_len == 1:
            return None, False
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if needs_window and window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    mask = allowed[None, None].expand(batch, 1, q_len, total)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask, False


class LlamaLM(nn.Module):
    """Decoder-only LLaMA-family language model returning logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg)
        # the attached method (methods.registry.Attached); what the layers above may ask of it: model/attached.py
        self.adapter: Any = None
        self.name_or_path: str | None = None  # where the weights came from (recorded in adapters)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def base_parameters(self) -> list[nn.Parameter]:
        """The language model's own weights (embedding, blocks' projections and norms, head), not what a
        method attached beside them (an image encoder, a projector), which keeps its own dtype and buffers."""
        own = (self.embed_tokens, self.norm, self.lm_head, *[m for m in self.layers.modules()
                                                                if isinstance(m, (nn.Linear, RMSNorm))])
        return list({id(p): p for m in own for p in m.parameters(recurse=False)}.values())

    def new_cache(self, batch_size: int, max_len: int, front: int = 0) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device, front)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
        output_positions: Any = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]; with `output_positions` (bool [B, T] or an index), only
        those positions' logits, so that training never runs the output head
        where there is no label. `return_hidden` gives the final normed states instead."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        ctx = ForwardContext(batch_size=x.shape[0], cache=cache, extras=dict(extras or {}))
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's context of {self.config.max_seq_len}"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        mask, is_causal = attention_mask_for(attention_mask, B, T, past, self.config.sliding_window, x.device)
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, ctx)
        if cache is not None:
            cache.length += T
        if output_positions is not None:
            x = x[output_positions]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

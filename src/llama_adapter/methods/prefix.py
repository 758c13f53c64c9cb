"""Zero-initialised gated prefix attention (the adaption prompt of LLaMA-Adapter).

out = softmax(q K_text^T / sqrt(d) + mask) V_text + g * softmax(q K_prompt^T / sqrt(d)) V_prompt

The text part is the layer's own attention; this module returns the second term. Prompt
keys get no rotary embedding; they go through the layer's frozen key/value projections.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from ..model.llama import Attention, ForwardContext, KVCache

GATES = ("per_head_tanh", "per_head", "scalar_tanh", "scalar")
# Ablations (docs/ablations.md), not the method's defaults:
INITS = ("zero", "random")  # "random": the paper's rand-init attention, the prefix at full weight from step 0
PROMPTS = ("linear", "mlp")  # "mlp": each layer's prompt produced by a small MLP from a learned seed
RANDOM_INIT_GATE = 3.0  # tanh(3) = 0.995: a tanh gate that lets the prefix in at (almost) full weight


def check_prompt_options(prompt_len: int, n_layers: int | None, gate: str, min_layers: int, init: str = "zero",
                         prompt: str = "linear", prompt_hidden: int = 1) -> None:
    """The validation every method with adaption prompts shares."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {prompt!r}; choose one of {', '.join(PROMPTS)}")
    if prompt_hidden < 1:
        raise ValueError(f"prompt_hidden must be >= 1, got {prompt_hidden}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if n_layers is not None and n_layers < min_layers:
        raise ValueError(f"n_layers must be >= {min_layers}, got {n_layers}")
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")


class GatedPrefix(nn.Module):
    """A learned prompt [K, C] and its gate, used as extra keys/values of one attention layer.

    `add_key` names a per-example tensor in the forward context ([B, C] or [B, K, C]) that is
    added to the prompt (visual tokens in the multimodal variants). With `row_key`, the prefix
    acts only on the rows that the context's boolean [B] tensor of that name marks (V2's visual
    prompts act on examples with an image, and not at all when no row has one). `input_scale`
    multiplies prompt (+ added tokens) before the projections, to bring an N(0, 1) prompt to the
    scale of what the layer's projections normally see (V2's visual prefix in the first layers;
    SmolLM2's layer 0 sees inputs of RMS 0.05); a saved buffer, so folding norms keeps it.

    Ablations: `init="random"` starts the gate open (gate value 1, or tanh(3) = 0.995 for tanh gates)
    instead of zero, so the randomly initialised prompt acts from step 0 as an ordinary attention prefix
    would (the paper's "rand-init attention"); the prompt's own init is unchanged, so the gate is the only
    difference. `prompt_kind="mlp"` computes the prompt as MLP(seed) (seed [K, C], MLP C -> hidden -> C)
    instead of holding it directly; it is still input-independent, so inference caches its keys/values alike.
    """

    def __init__(self, prompt_len: int, dim: int, n_heads: int, gate: str = "per_head_tanh",
                 add_key: str | None = None, device: torch.device | str | None = None,
                 row_key: str | None = None, input_scale: float = 1.0, init: str = "zero",
                 prompt_kind: str = "linear", prompt_hidden: int = 64):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {', '.join(GATES)}")
        check_prompt_options(prompt_len, None, gate, 0, init, prompt_kind, prompt_hidden)
        self.gate_kind = gate
        self.add_key = add_key
        self.row_key = row_key
        self.prompt_mlp: nn.Sequential | None = None
        if prompt_kind == "mlp":
            self.prompt_seed = nn.Parameter(torch.randn(prompt_len, dim, device=device))
            self.prompt_mlp = nn.Sequential(nn.Linear(dim, prompt_hidden), nn.GELU(),
                                            nn.Linear(prompt_hidden, dim)).to(device)
        else:
            self.prompt = nn.Parameter(torch.randn(prompt_len, dim, device=device))
        start = 0.0 if init == "zero" else (RANDOM_INIT_GATE if gate.endswith("tanh") else 1.0)
        self.gate = nn.Parameter(torch.full((n_heads if gate.startswith("per_head") else 1,), start, device=device))
        self.register_buffer("input_scale", torch.tensor(float(input_scale), device=device))
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None
        self._static_key: tuple | None = None

    def prompt_value(self) -> torch.Tensor:
        """The prompt [K, C]: the parameter itself, or MLP(seed) with `prompt_kind="mlp"`."""
        if self.prompt_mlp is not None:
            return self.prompt_mlp(self.prompt_seed)
        return self.prompt

    @property
    def prompt_len(self) -> int:
        return (self.prompt_seed if self.prompt_mlp is not None else self.prompt).shape[0]

    def gate_value(self) -> torch.Tensor:
        return torch.tanh(self.gate) if self.gate_kind.endswith("tanh") else self.gate

    input_scale: torch.Tensor  # a buffer (registered in __init__)

    def _compute(self, attn: Attention, dtype: torch.dtype,
                 extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.prompt_value().to(dtype)[None]
        if extra is not None:
            prompt = prompt + (extra[:, None] if extra.dim() == 2 else extra).to(dtype)
        return attn.project_kv(prompt * self.input_scale.to(dtype))

    def keys_values(self, attn: Attention, dtype: torch.dtype,
                    ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys/values [1 or B, G, K, d]. With gradients on they are always recomputed;
        for inference they are computed once (per generation, or once and for all when they do
        not depend on the input) and reused."""
        cache = ctx.cache
        if cache is not None and attn.layer_idx in cache.prefix:
            return cache.prefix[attn.layer_idx]
        extra = ctx.extras.get(self.add_key) if self.add_key else None
        if extra is None and not torch.is_grad_enabled():
            params = itertools.chain(self.parameters(), self.buffers(), attn.k_proj.parameters(),
                                     attn.v_proj.parameters())
            dev = self.gate.device.type
            amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            key = (dtype, amp, str(self.gate.device), tuple((id(p), p._version) for p in params))
            if self._static is None or key != self._static_key:
                self._static, self._static_key = self._compute(attn, dtype, None), key
            kv = self._static
        else:
            kv = self._compute(attn, dtype, extra)
        if cache is not None:
            cache.prefix[attn.layer_idx] = kv
        return kv

    def decode_terms(self, attn: Attention, cache: KVCache,
                     extras: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None] | None:
        """For the compiled decode step (model/fastpath.py), after the prefill: the prompt's keys and values
        [1 or B, G, K, d] as the prefill cached them, the gate per row and head [1 or B, H], and no bias over
        the prompt's keys (every row sees all of them); None where this prefix adds nothing to these rows (no row
        of `row_key`)."""
        rows = extras.get(self.row_key) if self.row_key else None
        if self.row_key and rows is None:
            return None
        if attn.layer_idx not in cache.prefix:
            raise ValueError(f"layer {attn.layer_idx}: no prompt keys/values in the cache; decode after a prefill")
        k, v = cache.prefix[attn.layer_idx]
        gate = self.gate_value().expand(attn.n_heads)[None]
        if rows is not None:
            gate = gate * rows.to(gate.dtype).view(-1, 1)
        return k, v, gate, None

    def forward(self, attn: Attention, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        rows = ctx.extras.get(self.row_key) if self.row_key else None
        if self.row_key and rows is None:
            return q.new_zeros(())
        k, v = self.keys_values(attn, q.dtype, ctx)
        # under autocast the projections may come out in another dtype
        out = prompt_attention(q, k.to(q.dtype), v.to(q.dtype))
        gate = self.gate_value().to(q.dtype).view(1, -1, 1, 1)
        if rows is not None:
            gate = gate * rows.to(q.dtype).view(q.shape[0], 1, 1, 1)
        return gate * out


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T / sqrt(d) + bias) V, ungated: queries [B, H, T, d], prompt keys/values [1 or B, G, K, d],
    an optional additive fp32 bias [1 or B, 1, 1, K] (masking padded keys)."""
    B, H, T, d = q.shape
    G = k.shape[1]
    # The query heads of a group share their prompt keys: fold them into the rows of one matmul.
    # (Explicit matmuls: with ~10 keys, CPU SDPA kernels are several times slower, in bf16 most.)
    qg = q.reshape(B, G, (H // G) * T, d)
    scores = ((qg @ k.transpose(-1, -2)) * d**-0.5).float()
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1).to(q.dtype) @ v).view(B, H, T, d)

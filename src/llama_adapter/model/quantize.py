"""Weight-only quantization of the frozen base: int8 or 4-bit weights for the blocks' linears.

Why: decoding at batch 1 is bound by reading the weights, so fewer weight bytes are directly
more tokens per second (on a CPU), and a 4-bit base lets a large model train its adapters on
a small GPU. The frozen projections of each block (q/k/v/o, gate/up/down) get `kind`; so do the
embedding and the output head (one table when tied, as in SmolLM2, where it is a fifth of the
weights: left in bf16 it kept int8 at 61% of bf16's memory), except that a 4-bit table is used
only where its rows can be gathered for the embedding (`QuantizedWeight.rows`: the CPU packing's
layout, verified at load), else that table is int8 per row; the norms stay in the model's dtype.
Adapters keep their own dtype and act on the quantized linear's output (V2's scale, extra bias
and LoRA: `AdaptableLinear.forward`).

- "int8": one symmetric scale per output channel (row), q = round(W / s), s = max|W_row| / 127.
- "int4": asymmetric groups of `INT4_GROUP` = 32 input columns, q = round((W - min) / s) in 0..15,
  s = (max - min) / 15 (a zero point per group keeps the resolution of lopsided groups; groups of
  64 raised SmolLM2's held-out NLL by 14%, groups of 32 left it unchanged).

Kernels are PyTorch's own (no hand-written kernel): `torch._weight_int8pack_mm` (CPU and CUDA),
`torch._weight_int4pack_mm_for_cpu` on a CPU and `torch._weight_int4pack_mm` (tinygemm, bf16,
Ampere or newer) on CUDA, each with its own packing op. Their activations are bf16 (fp16 for
int8 in an fp16 model): on the CPU the fp32 variants ran 7x (int8) and 23x (int4) slower than
the bf16 ones (docs/quantization.md), and CUDA's int4 kernel takes bf16 only; an fp32 model
casts the linear's input to bf16 and its output back.

Gradients flow through a quantized linear to its input (adapters in earlier layers train),
never to its weight: the backward multiplies by the dequantized weight, rebuilt per call.
A quantized model cannot be folded or exported (the weights are no longer the model's own):
load the base unquantized and the adapter on it for that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fused import GROUPS
from .llama import BLOCK_LINEARS

QUANTIZE_CHOICES = ("int8", "int4")
INT4_GROUP = 32
_INT4_N_MULTIPLE = 16  # the CPU packing op needs out_features divisible by 16 (CUDA's by 8)
# The CPU int4 packing's layout, as far as reading rows back needs it: rows in blocks of `b` (by the CPU's
# vector width); per input column, b/2 bytes, byte d holding the block's row d (low nibble) and row d + b/2
# (high nibble). Only used after checking it against the values just packed (`_cpu_int4_row_block`).
_CPU_INT4_ROW_BLOCKS = (64, 32, 16)

__all__ = ["QUANTIZE_CHOICES", "QuantizedWeight", "check_quantize", "quantization_of", "quantize_model",
           "refuse_quantized"]


def check_quantize(kind: Any) -> str | None:
    """The validated quantization name (None or "none": no quantization)."""
    if kind is None or kind == "none":
        return None
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {kind!r}; choose one of {', '.join(QUANTIZE_CHOICES)} (or none)")
    return str(kind)


def _kernel_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if (kind == "int8" and dtype == torch.float16) else torch.bfloat16


def _int4_inner_k_tiles(in_features: int) -> int:
    """CUDA's tinygemm packing: the largest of 8/4/2 tiles of 16 columns that divides the row."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs in_features divisible by 32, got {in_features}")


class QuantizedWeight(nn.Module):
    """One linear's packed weight and scales (non-persistent buffers: a quantized base is made at load
    time from the float weights and never saved), and the kernel that multiplies by it."""

    def __init__(self, kind: str, packed: torch.Tensor, scales: torch.Tensor, out_features: int,
                 in_features: int, group_size: int, compute_dtype: torch.dtype, row_block: int | None = None):
        super().__init__()
        self.kind, self.group_size, self.compute_dtype = kind, group_size, compute_dtype
        self.row_block = row_block  # int4 on a CPU: the packing's row block where `rows` can read it, else None
        self.packed_for = packed.device.type  # int4's packed layouts differ between the CPU and CUDA kernels
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, kind: str, group_size: int = INT4_GROUP,
                    compute_dtype: torch.dtype = torch.bfloat16, name: str = "weight",
                    rows: bool = False) -> QuantizedWeight:
        """`rows`: int4 on a CPU also learns whether `rows` can read the packed weight (a table's check, ~0.15 s
        for SmolLM2's; int8 can always be read)."""
        w = weight.detach().float()
        n, k = w.shape
        if kind == "int8":
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(kind, q, scale.to(compute_dtype), n, k, 0, compute_dtype)
        if kind != "int4":
            raise ValueError(f"unknown quantize {kind!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
        if k % group_size or n % _INT4_N_MULTIPLE:
            raise ValueError(f"int4 needs {name}'s in_features divisible by the group size {group_size} and "
                             f"out_features by {_INT4_N_MULTIPLE}; its shape is {n}x{k}")
        groups = w.view(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        # the kernels dequantize as (q - 8) * scale + zero: zero is the value of q = 8
        scales = torch.stack([step.t(), (low + 8 * step).t()], -1).contiguous().to(compute_dtype)
        if w.device.type == "cuda":
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _int4_inner_k_tiles(k))
            return cls(kind, packed, scales, n, k, group_size, compute_dtype)
        q = q.cpu()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        row_block = _cpu_int4_row_block(packed, q) if rows else None
        return cls(kind, packed, scales, n, k, group_size, compute_dtype, row_block)

    @property
    def has_rows(self) -> bool:
        """Whether `rows` can gather from this weight (int8 always; int4 where its packed layout was read)."""
        return self.kind == "int8" or self.row_block is not None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight [*ids.shape, in] (compute dtype), read from the packed weight
        without dequantizing the others: the embedding's lookup in a quantized table."""
        if self.kind == "int8":
            return self.packed[ids].to(self.compute_dtype) * self._scales()[ids].unsqueeze(-1)
        if self.row_block is None:
            raise ValueError("this int4 weight's packed layout is not one whose rows can be read")
        flat, half, k = ids.reshape(-1), self.row_block // 2, self.in_features
        columns = torch.arange(k, device=flat.device) * half
        at = (flat // self.row_block * (k * half) + flat % half)[:, None] + columns  # [T, k] byte positions
        byte = self.packed.reshape(-1)[at]
        q = torch.where((flat % self.row_block < half)[:, None], byte & 15, byte >> 4).float()
        scales = self._scales()[:, flat].float().transpose(0, 1)  # [T, k / group, (step, zero)]
        w = (q.view(len(flat), -1, self.group_size) - 8) * scales[..., :1] + scales[..., 1:]
        return w.to(self.compute_dtype).view(*ids.shape, k)

    packed: torch.Tensor
    scales: torch.Tensor

    def _scales(self) -> torch.Tensor:
        # `model.to(dtype)` casts float buffers; the kernels want the activation dtype
        s = self.scales
        return s if s.dtype == self.compute_dtype else s.to(self.compute_dtype)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d [M, in] (compute dtype, contiguous) @ W.T -> [M, out], through PyTorch's packed kernel."""
        if self.kind == "int4" and x2d.device.type != self.packed_for:
            raise ValueError(f"int4 weights packed for {self.packed_for} cannot run on {x2d.device.type}: the "
                             f"packed layouts differ; load the model with quantize='int4' on the device it runs on")
        return packed_matmul(x2d, *self.terms())

    def terms(self) -> tuple[str, torch.Tensor, torch.Tensor, int]:
        """What `packed_matmul` takes besides the input: kind, packed weight, scales (kernel dtype), group size."""
        return self.kind, self.packed, self._scales(), self.group_size

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] the kernel multiplies by (int4: the kernel applied to the identity,
        so that it is exactly the kernel's own dequantization, whatever its packed layout)."""
        if self.kind == "int8":
            w = self.packed.to(self.compute_dtype) * self._scales()[:, None]
        else:
            packed: torch.Tensor = self.packed
            eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=packed.device)
            w = self.matmul(eye).t()
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.dtype != self.compute_dtype or not x2d.is_contiguous():
            x2d = x2d.to(self.compute_dtype).contiguous()
        y = _QuantizedMatmul.apply(x2d, self) if x.requires_grad and torch.is_grad_enabled() else self.matmul(x2d)
        y = y.view(*shape[:-1], self.out_features)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.kind == "int4" else ""
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}{group}"


def _cpu_int4_row_block(packed: torch.Tensor, q: torch.Tensor) -> int | None:
    """The row block of `_CPU_INT4_ROW_BLOCKS` under which `packed` holds exactly the values `q` [n, k] (0..15),
    or None when it is none of them (another torch or CPU packs differently: the table then stays int8)."""
    n, k = q.shape
    data = packed.contiguous().view(-1)
    if data.numel() * 2 != n * k:
        return None
    for block in _CPU_INT4_ROW_BLOCKS:
        if n % block:
            continue
        half = block // 2
        cells = data.view(n // block, k, half)
        rows = q.view(n // block, 2, half, k)
        if (torch.equal((cells & 15).int(), rows[:, 0].transpose(1, 2))
                and torch.equal((cells >> 4).int(), rows[:, 1].transpose(1, 2))):
            return block
    return None


def packed_matmul(x2d: torch.Tensor, kind: str, packed: torch.Tensor, scales: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """x2d @ W.T for a packed W through PyTorch's kernel for its kind and device (also called inside the compiled
    decode graph, model/fastpath.py)."""
    if kind == "int8":
        return torch._weight_int8pack_mm(x2d, packed, scales)
    if packed.device.type == "cuda":
        return torch._weight_int4pack_mm(x2d, packed, group_size, scales)
    return torch._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scales)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W.T with a packed W: the input gets its gradient, the weight none."""

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        ctx.qw = qw
        return qw.matmul(x2d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.qw.dequantize(grad.dtype), None


class QuantizedHead(nn.Module):
    """The output head over a quantized table (rows: the vocabulary)."""

    def __init__(self, table: QuantizedWeight, like: torch.Tensor):
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.in_features, table.out_features
        self.weight = nn.Parameter(like.new_empty(0), requires_grad=False)  # device/dtype, as on the linears
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


class QuantizedEmbedding(nn.Module):
    """Token embeddings read from a quantized table (the head's own when the two are tied): row i dequantized."""

    def __init__(self, table: QuantizedWeight, like: torch.Tensor):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.weight = nn.Parameter(like.new_empty(0), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids).to(self.weight.dtype)


def _table(weight: torch.Tensor, kind: str, group_size: int) -> QuantizedWeight:
    """A quantized embedding/head table of `kind` when its rows can be gathered (int4: on a CPU, its shape and
    packed layout permitting), else int8 per row."""
    if kind == "int4" and weight.device.type == "cpu":
        n, k = weight.shape
        if k % group_size == 0 and n % _INT4_N_MULTIPLE == 0:
            table = QuantizedWeight.from_weight(weight, kind, group_size, _kernel_dtype(kind, weight.dtype), rows=True)
            if table.has_rows:
                return table
    return QuantizedWeight.from_weight(weight, "int8", compute_dtype=_kernel_dtype("int8", weight.dtype))


def _quantize_head(model: Any, kind: str, group_size: int) -> None:
    """The embedding and the output head as quantized tables (`_table`), one for both when they are tied."""
    head, emb = model.lm_head, model.embed_tokens
    head_table = _table(head.weight, kind, group_size)
    emb_table = head_table if head.weight is emb.weight else _table(emb.weight, kind, group_size)
    model.lm_head, model.embed_tokens = QuantizedHead(head_table, head.weight), QuantizedEmbedding(emb_table,
                                                                                                  emb.weight)


def _linears(model: nn.Module) -> list[tuple[str, Any]]:
    out = []
    for i, layer in enumerate(getattr(model, "layers", ())):
        for parent, names in BLOCK_LINEARS:
            for n in names:
                out.append((f"layers.{i}.{parent}.{n}", getattr(getattr(layer, parent), n)))
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str | None, group_size: int = INT4_GROUP, head: bool = True) -> nn.Module:
    """Replace the weight of each block's q/k/v/o and gate/up/down linear by a packed `QuantizedWeight`
    (in place; `weight` becomes an empty tensor of the same device and dtype, the float weight is freed).
    `head`: also the embedding and the output head (`_table`: int4 only where its rows can be gathered, else
    int8; docs/quantization.md: on SmolLM2 the tied table is a fifth of the weights). None leaves the model as
    it is."""
    kind = check_quantize(kind)
    if kind is None:
        return model
    current = quantization_of(model)
    if current is not None:
        raise ValueError(f"the model is already quantized ({current}); load it again to quantize differently")
    lm: Any = model
    head = head and hasattr(lm, "lm_head") and hasattr(lm, "embed_tokens")
    ends = [("lm_head", lm.lm_head), ("embed_tokens", lm.embed_tokens)] if head else []
    for name, m in _linears(model) + ends:
        if m.weight.requires_grad:
            raise ValueError(f"{name}.weight is trainable; only a frozen base can be quantized")
    for layer in getattr(model, "layers", ()):  # joint q/k/v and gate/up tensors (model/fused.py) go too
        for parent, names in GROUPS:
            for n in names:
                getattr(getattr(layer, parent), n).__dict__.pop("_joint", None)
    for name, m in _linears(model):
        weight = m.weight
        m.quantized = QuantizedWeight.from_weight(weight, kind, group_size, _kernel_dtype(kind, weight.dtype), name)
        # an empty placeholder keeps what code asks of `weight` (device, dtype) and frees the float weight
        m.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
    if head:
        _quantize_head(model, kind, group_size)
    return model


def quantization_of(model: nn.Module) -> str | None:
    """"int8"/"int4" when the model's block linears are quantized, else None."""
    for m in getattr(model, "layers", model).modules():
        if isinstance(m, QuantizedWeight):
            return m.kind
    return None


def refuse_quantized(model: nn.Module, action: str) -> None:
    """Raise a clear error for what needs the model's float weights (folding, exporting)."""
    kind = quantization_of(model)
    if kind is not None:
        raise ValueError(
            f"cannot {action} a model whose base is quantized ({kind}): its weights are no longer the model's "
            f"own. Load the base unquantized (load_pretrained(..., quantize=None), no --quantize), load the "
            f"adapter on it (la.load_adapter; adapters trained on a quantized base fit it), then {action}"
        )

"""Fold per-channel scales, extra biases and LoRA updates into the frozen weights, so that an
adapted model costs nothing extra at inference: W' = s (W + BA), b' = s (b + delta_b)."""

from __future__ import annotations

import torch
from torch import nn

from ..model.llama import AdaptableLinear, LlamaLM
from ..model.quantize import refuse_quantized
from .lora import LoRA


def fold_linear(m: AdaptableLinear) -> bool:
    """Fold one linear in place; True when it had anything to fold."""
    if m.plain:
        return False
    dtype = m.weight.dtype
    w = m.weight.detach().float()
    if isinstance(m.lora, LoRA):
        w = w + m.lora.delta_weight()
    elif m.lora is not None:
        raise TypeError(f"cannot fold a {type(m.lora).__name__} low-rank update (only LoRA folds)")
    b = m.bias.detach().float() if m.bias is not None else None
    if m.delta_bias is not None:
        b = m.delta_bias.detach().float() if b is None else b + m.delta_bias.detach().float()
    if m.scale is not None:
        s = m.scale.detach().float()
        w = w * s[:, None]
        b = None if b is None else b * s
    for name in ("scale", "delta_bias"):
        if name in m._parameters:
            del m._parameters[name]
        setattr(m, name, None)
    if m.lora is not None:
        del m._modules["lora"]
        m.lora = None
    m.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if b is not None:
        m.bias = nn.Parameter(b.to(dtype), requires_grad=False)
    return True


@torch.no_grad()
def fold(model: LlamaLM) -> LlamaLM:
    """Fold every adaptable linear of the model; the attached method forgets what was folded."""
    refuse_quantized(model, "fold")
    folded = False
    for m in model.modules():
        if isinstance(m, AdaptableLinear):
            folded |= fold_linear(m)
    has_bias = [(m.bias is not None) for m in model.modules() if isinstance(m, AdaptableLinear)]
    if all(has_bias):
        model.config.qkv_bias = model.config.o_bias = model.config.mlp_bias = True
    if model.adapter is not None and folded:
        on_fold = getattr(model.adapter.config, "after_fold", None)
        if on_fold is not None:
            model.adapter.config = on_fold()
        names = dict(model.named_parameters())
        model.adapter.groups = {g: [n for n in ns if n in names and not _base_name(n)]
                                for g, ns in model.adapter.groups.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for n in model.adapter.parameter_names():
            names[n].requires_grad_(True)
    return model


def _base_name(name: str) -> bool:
    """Norm weights become part of the base when folding (they already live in the base weights)."""
    return name.endswith("layernorm.weight") or name == "norm.weight"

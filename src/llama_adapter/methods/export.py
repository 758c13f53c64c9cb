"""Export an adapted model as an ordinary Hugging Face folder.

Scales, biases, LoRA and norms are folded into the weights, so the folder loads in
transformers as a `LlamaForCausalLM` with `attention_bias`/`mlp_bias`. What cannot be folded
(adaption prompts, visual modules) is written beside it, in `adapter/`, as an adapter
checkpoint whose base model is the exported folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_folder
from ..model.llama import AdaptableLinear, LlamaLM
from ..model.load import build_model, save_folder
from ..model.tokenizer import Tokenizer
from .fold import fold
from .io import save_adapter
from .registry import trainable_parameters


def _complete_biases(model: LlamaLM) -> bool:
    """Give every linear of the blocks a bias (zeros where it had none) if any has one, because a
    Llama config can only say "all attention linears have biases" and "all MLP linears have"."""
    linears = [m for m in model.layers.modules() if isinstance(m, AdaptableLinear)]
    if not any(m.bias is not None for m in linears):
        return False
    for m in linears:
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=False)
    return True


@torch.no_grad()
def export_folded(model: LlamaLM, tok: Tokenizer, out: str | Path) -> Path:
    """Fold the model and write `out` (and `out/adapter` when prompts or visual modules remain)."""
    out = Path(out)
    fold(model)
    cfg = model.config
    if _complete_biases(model):
        cfg = dataclasses.replace(cfg, model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True,
                                  sliding_window=None)
    base_keys = set(build_model(cfg, device="meta").state_dict())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k in base_keys}
    remaining = bool(trainable_parameters(model))

    def fill(tmp: Path) -> None:
        save_folder(tmp, cfg, state, tok)
        if remaining:
            model.name_or_path = str(out)
            save_adapter(model, tmp / "adapter")

    atomic_folder(out, fill)
    model.config = cfg
    return out

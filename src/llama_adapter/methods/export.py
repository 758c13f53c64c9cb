"""Export an adapted model as an ordinary Hugging Face folder.

Scales, biases, LoRA and norms are folded into the weights of a copy of the model (the model
given stays as it was, still trainable), so the folder loads in transformers and in
`load_pretrained` with the adapted model's logits. What cannot be folded (adaption prompts,
visual modules) is written beside it, in `adapter/`, as an adapter checkpoint whose base model
is the exported folder.

The folder keeps the base model's architecture when it can express the folded weights. When
folding gave linears biases the base architecture has no place for (V2 bias tuning on LLaMA or
Mistral), every linear gets a bias (zeros where it had none) and the folder is written as a
`LlamaForCausalLM` with `attention_bias`/`mlp_bias`, or, when the model has a sliding window
(which a Llama config cannot carry), as a `SmolLM3ForCausalLM`: the same blocks with biases on
every linear and the window in every layer.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_folder
from ..model.config import ModelConfig
from ..model.llama import AdaptableLinear, LlamaLM
from ..model.load import build_model, save_folder
from ..model.quantize import refuse_quantized
from ..model.tokenizer import Tokenizer
from .fold import fold
from .io import save_adapter
from .registry import trainable_parameters


def _complete_biases(model: LlamaLM) -> bool:
    """Give every linear of the blocks a bias (zeros where it had none) if any has one, because the
    configs can only say "all attention linears have biases" and "all MLP linears have"."""
    linears = [m for m in model.layers.modules() if isinstance(m, AdaptableLinear)]
    if not any(m.bias is not None for m in linears):
        return False
    for m in linears:
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                  requires_grad=False)
    return True


def with_biases(cfg: ModelConfig) -> ModelConfig:
    """The config of `cfg`'s model with a bias on every linear, in an architecture that keeps its window."""
    model_type = "llama" if cfg.sliding_window is None else "smollm3"
    return dataclasses.replace(cfg, model_type=model_type, qkv_bias=True, o_bias=True, mlp_bias=True)


def _folding_copy(model: LlamaLM) -> LlamaLM:
    """A copy to fold that shares the frozen weights, buffers and fused q/k/v tensors (model/fused.py)
    with `model`, so it costs only the trained tensors: folding replaces a weight, never writes into it."""
    trained = {id(p) for p in trainable_parameters(model).values()}
    shared: list = [p for p in model.parameters() if id(p) not in trained]
    shared += list(model.buffers())
    shared += [m.__dict__["_joint"] for m in model.modules() if "_joint" in m.__dict__]
    return copy.deepcopy(model, {id(x): x for x in shared})


@torch.no_grad()
def export_folded(model: LlamaLM, tok: Tokenizer, out: str | Path) -> Path:
    """Write `out` (and `out/adapter` when prompts or visual modules remain) from a folded copy of `model`."""
    out = Path(out)
    refuse_quantized(model, "export")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    folded = fold(_folding_copy(model))
    for p in model.parameters():  # shared weights: folding freezes the copy's parameters
        p.requires_grad_(flags[id(p)])
    cfg = folded.config
    if _complete_biases(folded):
        cfg = with_biases(cfg)
        folded.config = cfg
    base_keys = set(build_model(cfg, device="meta").state_dict())
    state = {k: v.detach().cpu() for k, v in folded.state_dict().items() if k in base_keys}
    remaining = bool(trainable_parameters(folded))

    def fill(tmp: Path) -> None:
        save_folder(tmp, cfg, state, tok)
        if remaining:
            folded.name_or_path = str(out)
            save_adapter(folded, tmp / "adapter")

    return atomic_folder(out, fill)

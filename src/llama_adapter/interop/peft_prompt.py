"""PEFT AdaptionPrompt folders (adapter_config.json with peft_type ADAPTION_PROMPT, adapter_model.safetensors).

PEFT wraps the top `adapter_layers` attention modules of a transformers Llama/Mistral: per
layer a prompt [1, adapter_len, C] through the layer's k/v projections (no rotary), one scalar
gate [1] without tanh on the separately soft-maxed prompt attention, key/value heads repeated
for grouped-query attention, and the branch's output through o_proj, added. That is our V1
with gate="scalar" (o_proj is linear, so projecting the sum equals summing the projections),
except when o_proj has a bias: PEFT then adds it a second time, which we refuse to imitate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..fileio import atomic_write, atomic_write_json
from ..methods.adapter_v1 import AdapterV1Config
from ..model.llama import LlamaLM
from .imported import Imported, expect_shape, refuse_keys, shape_why

KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)")
GATE_NOTE = ("PEFT's gate is one scalar used without tanh: loaded as AdapterV1 with gate='scalar', a compatibility "
             "mode (our default is per-head gates through tanh)")
PEFT_MODEL_TYPES = ("llama", "mistral")


def _check_base(model: LlamaLM, origin: str) -> None:
    c = model.config
    if c.o_bias:
        raise ValueError(f"{origin}: PEFT's adaption prompt adds o_proj's bias a second time in every adapted layer; "
                         f"this base model's o_proj has a bias, and our modules do not reproduce that")
    if c.n_heads * c.head_dim != c.dim:
        raise ValueError(f"{origin}: PEFT's adaption prompt assumes n_heads * head_dim == hidden size "
                         f"({c.n_heads} * {c.head_dim} != {c.dim} here)")


def import_peft_prompt(model: LlamaLM, folder: Path, config: dict[str, Any],
                       tensors: dict[str, torch.Tensor]) -> Imported:
    origin, c, why = str(folder), model.config, shape_why(model)
    _check_base(model, origin)
    try:
        prompt_len, n_adapted = int(config["adapter_len"]), int(config["adapter_layers"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{folder}/adapter_config.json: an adaption-prompt config needs integer adapter_len and "
                         f"adapter_layers") from None
    if config.get("target_modules", "self_attn") != "self_attn":
        raise ValueError(f"{origin}: target_modules {config['target_modules']!r} is not supported (self_attn only)")
    if n_adapted > c.n_layers:
        raise ValueError(f"{origin}: adapter_layers={n_adapted}, but this base model has {c.n_layers} layers ({why})")
    refuse_keys(origin, [k for k in tensors if not KEY.fullmatch(k)], "not adaption prompts or gates")
    first = c.n_layers - n_adapted
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        assert m is not None
        i, kind = int(m.group(1)), m.group(2)
        if not first <= i < c.n_layers:
            raise ValueError(f"{origin}: {key} is for layer {i}, outside the top {n_adapted} of this base model's "
                             f"{c.n_layers} layers ({why})")
        if kind == "adaption_prompt":
            expect_shape(origin, key, t, (1, prompt_len, c.dim), why)
            ours = f"layers.{i}.self_attn.prefix.prompt"
            out[ours] = t[0]
        else:
            expect_shape(origin, key, t, (1,), why)
            ours = f"layers.{i}.self_attn.prefix.gate"
            out[ours] = t
        source[ours] = key
    missing = [f"layers.{i}.self_attn.{k}" for i in range(first, c.n_layers) for k in ("adaption_prompt",
               "adaption_gate") if f"layers.{i}.self_attn.prefix.{k.split('_')[1]}" not in out]
    if missing:
        raise ValueError(f"{origin}: tensors of adapted layers are missing: {missing[:4]}")
    return Imported(AdapterV1Config(prompt_len=prompt_len, n_layers=n_adapted, gate="scalar"), out, source,
                    [GATE_NOTE])


def export_peft_prompt(model: LlamaLM, folder: Path) -> Path:
    """Our V1 (scalar gates, no vision) as a PEFT AdaptionPrompt folder."""
    attached = model.adapter
    cfg = attached.config
    if cfg.gate != "scalar":
        raise ValueError(f"PEFT's adaption prompt has one scalar gate without tanh; this adapter has gate={cfg.gate!r} "
                         f"(train with gate='scalar' to export it to PEFT)")
    if cfg.vision:
        raise ValueError("PEFT's adaption prompt has no visual input; this V1 adapter is multimodal")
    if model.config.model_type not in PEFT_MODEL_TYPES:
        raise ValueError(f"PEFT's adaption prompt supports model types {PEFT_MODEL_TYPES}, not "
                         f"{model.config.model_type!r}")
    _check_base(model, "export to PEFT")
    layers = cfg.adapted_layers(model.config.n_layers)
    tensors: dict[str, torch.Tensor] = {}
    for i in layers:
        prefix = model.layers[i].self_attn.prefix
        if float(prefix.input_scale) != 1.0:
            raise ValueError(f"layer {i}'s prompt has input_scale {float(prefix.input_scale)}; PEFT has none")
        base = f"base_model.model.model.layers.{i}.self_attn"
        tensors[f"{base}.adaption_prompt"] = prefix.prompt.detach().cpu()[None].contiguous()
        tensors[f"{base}.adaption_gate"] = prefix.gate.detach().cpu().reshape(1).contiguous()
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": cfg.prompt_len,
              "adapter_layers": len(layers), "target_modules": "self_attn", "inference_mode": True,
              "base_model_name_or_path": getattr(model, "name_or_path", None), "revision": None,
              "auto_mapping": None}
    atomic_write(folder / "adapter_model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_json(folder / "adapter_config.json", config)
    return folder

"""PEFT LoRA folders on the linears that V2 adapts <-> our V2 with LoRA only.

PEFT: y = W x + (alpha / r) B A x (alpha / sqrt(r) with rsLoRA), A [r, in] (`lora_A.weight`),
B [out, r] (`lora_B.weight`) on the targeted q/k/v/o/gate/up/down projections. Ours is the same
product with scaling alpha / r, so rsLoRA maps to alpha' = alpha * sqrt(r). Layers PEFT left
out (layers_to_transform) keep B = 0: no update, as in PEFT. DoRA, per-module ranks or alphas,
trained biases, modules_to_save and targets outside those linears are refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..fileio import atomic_write, atomic_write_json
from ..methods.adapter_v2 import LINEARS, AdapterV2Config
from ..model.llama import LlamaLM
from .imported import Imported, refuse_keys

KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                 r"(?:\.default)?\.weight")
PARTS = {name: ("self_attn" if name in LINEARS[:4] else "mlp") for name in LINEARS}


def _refuse_options(origin: str, config: dict[str, Any]) -> None:
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "layer_replication": bool(config.get("layer_replication")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(f"{origin}/adapter_config.json: LoRA options our V2 LoRA cannot represent: "
                         + ", ".join(f"{k}={config.get(k)!r}" for k in bad))


def import_peft_lora(model: LlamaLM, folder: Path, config: dict[str, Any],
                     tensors: dict[str, torch.Tensor]) -> Imported:
    origin = str(folder)
    _refuse_options(origin, config)
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{folder}/adapter_config.json: a LoRA config needs r and lora_alpha") from None
    refuse_keys(origin, [k for k in tensors if not (m := KEY.fullmatch(k)) or m.group(3) not in LINEARS
                         or PARTS[m.group(3)] != m.group(2)],
                "our V2 LoRA adapts only the q/k/v/o and gate/up/down projections of the blocks")
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # our scaling alpha / r equals PEFT's alpha / sqrt(r)
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    targets = set()
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        assert m is not None
        i, part, name, side = m.groups()
        if int(i) >= model.config.n_layers:
            raise ValueError(f"{origin}: {key} is for layer {i}, but this base model has {model.config.n_layers} "
                             f"layers")
        targets.add(name)
        ours = f"layers.{i}.{part}.{name}.lora.{side}"
        out[ours], source[ours] = t, key
    cfg = AdapterV2Config(n_layers=0, bias_scale=False, norms=False, lora_rank=rank, lora_alpha=alpha,
                          lora_targets=tuple(n for n in LINEARS if n in targets))
    return Imported(cfg, out, source)


def export_peft_lora(model: LlamaLM, folder: Path) -> Path:
    """Our V2 with LoRA only (no prompts, scales, biases, norms or vision) as a PEFT LoRA folder."""
    cfg = model.adapter.config
    late = cfg.layer_split(model.config.n_layers)[1]
    extra = [what for what, on in (("adaption prompts (n_layers > 0)", len(late) > 0), ("bias_scale", cfg.bias_scale),
                                   ("norms", cfg.norms), ("vision", bool(cfg.vision))) if on]
    if cfg.lora_rank < 1 or extra:
        raise ValueError("PEFT LoRA export takes a V2 adapter with LoRA only; this one "
                         + (f"also has {', '.join(extra)}" if extra else "has no LoRA (lora_rank=0)")
                         + " (fold it into the weights with `llama-adapter export` instead)")
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        for name in cfg.lora_targets:
            lora = getattr(getattr(layer, PARTS[name]), name).lora
            base = f"base_model.model.model.layers.{i}.{PARTS[name]}.{name}"
            tensors[f"{base}.lora_A.weight"] = lora.A.detach().cpu().contiguous()
            tensors[f"{base}.lora_B.weight"] = lora.B.detach().cpu().contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "target_modules": list(cfg.lora_targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "base_model_name_or_path": getattr(model, "name_or_path", None), "revision": None,
              "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    atomic_write(folder / "adapter_model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_json(folder / "adapter_config.json", config)
    return folder

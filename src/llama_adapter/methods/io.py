"""Adapter-only checkpoints: safetensors of the trained tensors plus a JSON config naming
the base model and the method. Loading never unpickles anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write, atomic_write_json, read_json
from ..model.llama import LlamaLM
from .registry import adapter_tensors, attach, config_from_dict

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def adapter_metadata(model: LlamaLM) -> dict[str, Any]:
    if model.adapter is None:
        raise ValueError("no adapter is attached to this model")
    return {
        "format_version": FORMAT_VERSION,
        "method": model.adapter.method,
        "config": dataclasses.asdict(model.adapter.config),
        "base_model": getattr(model, "name_or_path", None),
        "base_shape": {k: getattr(model.config, k) for k in _SHAPE_FIELDS},
    }


def save_adapter(model: LlamaLM, folder: str | Path) -> Path:
    """Write only what was trained, and the method's state buffers (a few hundred KB for SmolLM2 with V1),
    atomically."""
    folder = Path(folder)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in adapter_tensors(model).items()}
    meta = adapter_metadata(model)
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"method": meta["method"]}))
    atomic_write_json(folder / CONFIG, meta)
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    meta = read_json(path, f"no adapter checkpoint in {folder}: adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported adapter format_version {meta.get('format_version')!r}")
    return meta


def load_adapter(model: LlamaLM, folder: str | Path) -> LlamaLM:
    """Attach the checkpoint's method (if not yet attached) and load its tensors."""
    folder = Path(folder)
    meta = read_adapter_config(folder)
    shape = {k: getattr(model.config, k) for k in _SHAPE_FIELDS}
    if meta["base_shape"] != shape:
        raise ValueError(f"the adapter in {folder} was trained on a model shaped {meta['base_shape']} "
                         f"(base {meta['base_model']!r}); this model is shaped {shape}")
    if model.adapter is None:
        attach(model, config_from_dict(meta["method"], meta["config"]))
    elif model.adapter.method != meta["method"]:
        raise ValueError(f"the model has a {model.adapter.method} adapter; {folder} holds {meta['method']}")
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights missing: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    params = adapter_tensors(model)
    if tensors.keys() != params.keys():
        missing, extra = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
        raise ValueError(f"{path} does not fit the attached {meta['method']}: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return model

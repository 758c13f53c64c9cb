"""Adapter-only checkpoints: safetensors of the trained tensors plus a JSON config naming
the base model and the method. Loading never unpickles anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checksum import record_checksums, verify_checksums
from ..fileio import atomic_write, atomic_write_json, read_json
from ..model.llama import LlamaLM
from ..model.load import DEFAULT_MODEL, load_pretrained
from ..model.tokenizer import Tokenizer
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
    record_checksums(folder, [WEIGHTS, CONFIG])  # verified on load: a corrupt or swapped file is refused
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    meta = read_json(path, f"no adapter checkpoint in {folder}: adapter config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported adapter format_version {meta.get('format_version')!r}")
    return meta


def _model_name(name: str | None) -> str | None:
    """A base model's name as compared: the last path component, lower case, without .gguf (so the same
    folder moved elsewhere is the same model)."""
    if not name:
        return None
    base = Path(str(name).rstrip("/\\")).name.lower()
    return base.removesuffix(".gguf")


def check_base(model: LlamaLM, meta: dict[str, Any], folder: Path, force: bool = False) -> None:
    """Refuse an adapter trained on another base model (name or shape), naming both values. `force` lets a
    differing name or shape through; the tensors must still fit the model."""
    if force:
        return
    saved = meta.get("base_shape") or {}
    shape = {k: getattr(model.config, k) for k in _SHAPE_FIELDS}
    diffs = [f"{k} {saved.get(k)} (adapter) vs {shape[k]} (this model)" for k in _SHAPE_FIELDS
             if k in saved and saved[k] != shape[k]]
    name, ours = meta.get("base_model"), getattr(model, "name_or_path", None)
    if _model_name(name) and _model_name(ours) and _model_name(name) != _model_name(ours):
        diffs.insert(0, f"name {name!r} (adapter) vs {ours!r} (this model)")
    if diffs:
        raise ValueError(f"the adapter in {folder} was trained on another base model: {'; '.join(diffs)}. "
                         f"Load it on its own base model, or pass --force (force=True) if the base is the same "
                         f"model under another name; differing shapes are refused unless every tensor fits")


def load_adapter(model: LlamaLM, folder: str | Path, tokenizer: Tokenizer | None = None,
                 force: bool = False) -> LlamaLM:
    """Attach the checkpoint's method (if not yet attached) and load its tensors.

    The files are checked against their checksums and the base model against the adapter's (name and shape)
    before anything is attached; `force` skips the base check. `tokenizer`: the model's, for a method that
    needs one to attach (LaVIN; see `attach`)."""
    folder = Path(folder)
    verify_checksums(folder, [CONFIG, WEIGHTS])
    meta = read_adapter_config(folder)
    check_base(model, meta, folder, force)
    if model.adapter is None:
        attach(model, config_from_dict(meta["method"], meta["config"]), tokenizer)
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


def load_adapted(adapter: str | Path | None, model: str | Path | None = None, dtype: str = "fp32",
                 device: str = "auto", force: bool = False,
                 quantize: str | None = None) -> tuple[LlamaLM, Tokenizer]:
    """The base model (`model`, else the adapter's own base model, else the default) with the adapter
    checkpoint `adapter` (if any) loaded on top: what the commands that run a model start from."""
    if adapter:
        verify_checksums(adapter, [CONFIG, WEIGHTS])  # before the (slow) base model load
    name = model
    if name is None:
        name = (read_adapter_config(adapter).get("base_model") if adapter else None) or DEFAULT_MODEL
    base, tok = load_pretrained(name, dtype=dtype, device=device, quantize=quantize)
    if adapter:
        load_adapter(base, adapter, tokenizer=tok, force=force)
    return base, tok

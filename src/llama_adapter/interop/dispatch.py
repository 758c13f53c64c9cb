"""Recognise an adapter file or folder and load it with the right importer; save ours or PEFT's format.

`load_adapter(model, path, format=None)` is the public entry point (exported as `la.load_adapter`):
our own folders go through `methods.io` unchanged; the reference releases and PEFT folders go
through the importers of this package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checksum import verify_checksums
from ..methods import io as own
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer
from .imported import Imported, install
from .lavin_release import import_lavin, is_lavin
from .peft_lora import export_peft_lora, import_peft_lora
from .peft_prompt import export_peft_prompt, import_peft_prompt
from .pth import read_pth, state_dict_of
from .v1_release import import_v1_release, is_v1_release
from .v2_release import import_v2_release, is_v2_release

FORMATS = ("ours", "v1-release", "v2-release", "lavin", "peft-prompt", "peft-lora")
SAVE_FORMATS = ("ours", "peft")
PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PEFT_TYPES = {"ADAPTION_PROMPT": "peft-prompt", "LORA": "peft-lora"}


def _folder_config(folder: Path) -> dict[str, Any]:
    path = folder / own.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder: no {own.CONFIG} in it")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def _folder_format(folder: Path, config: dict[str, Any]) -> str:
    if "peft_type" in config:
        kind = str(config["peft_type"])
        if kind not in PEFT_TYPES:
            raise ValueError(f"{folder}: PEFT adapter type {kind!r} is not supported (only "
                             f"{', '.join(PEFT_TYPES)})")
        return PEFT_TYPES[kind]
    if "format_version" in config and "method" in config:
        return "ours"
    raise ValueError(f"{folder / own.CONFIG} is neither our adapter config (format_version, method) nor a PEFT one "
                     f"(peft_type): unknown adapter format")


def _pth_format(path: Path, obj: Any) -> str:
    if is_v2_release(obj):
        return "v2-release"
    state = state_dict_of(obj, path)
    if is_lavin(state):
        return "lavin"
    if is_v1_release(state):
        return "v1-release"
    keys = sorted(state)[:6]
    raise ValueError(f"{path}: unknown adapter format (keys {keys}...); known: LLaMA-Adapter V1 release "
                     f"(adapter_query.weight + layers.N.attention.gate), V2 release ({{'model', 'config'}} with "
                     f"llama.* keys), LaVIN (layers.N.adapter_attn.*); or name it with format=")


def _normalise(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.name == own.CONFIG:
        return p.parent
    if not p.exists():
        raise FileNotFoundError(f"no adapter at {p}: looked for a folder with {own.CONFIG} or a "
                                f"{'/'.join(PTH_SUFFIXES)} file")
    if p.is_file() and p.suffix == ".safetensors":
        raise ValueError(f"{p}: give the adapter's folder (with {own.CONFIG}), not its weights file alone")
    if p.is_file() and p.suffix not in PTH_SUFFIXES:
        raise ValueError(f"{p}: unknown adapter format (expected a folder, or a {'/'.join(PTH_SUFFIXES)} file)")
    return p


def detect_format(path: str | Path) -> str:
    """Which of FORMATS `path` holds (reading a .pth safely); a clear error when none."""
    p = _normalise(path)
    return _folder_format(p, _folder_config(p)) if p.is_dir() else _pth_format(p, read_pth(p))


def _peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / own.WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights missing: {path}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def import_adapter(model: LlamaLM, path: str | Path, format: str | None = None, *, skip_visual: bool = False,
                   prompt_len: int | None = None, temperature: float | None = None,
                   progress: bool = False, vision: str | None = None) -> Imported:
    """A reference or PEFT adapter as our config and tensors (nothing attached yet)."""
    p = _normalise(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; known: {', '.join(FORMATS)}")
    if p.is_dir():
        config = _folder_config(p)
        fmt = format or _folder_format(p, config)
        if fmt == "peft-prompt":
            return import_peft_prompt(model, p, config, _peft_tensors(p))
        if fmt == "peft-lora":
            return import_peft_lora(model, p, config, _peft_tensors(p))
        raise ValueError(f"{p} is a folder; format {fmt!r} is a .pth file")
    obj = read_pth(p, progress=progress)
    fmt = format or _pth_format(p, obj)
    state = state_dict_of(obj, p)
    if fmt == "v1-release":
        return import_v1_release(model, state, str(p), prompt_len=prompt_len or 10)
    if fmt == "v2-release":
        release = obj.get("config") if isinstance(obj, dict) else None
        return import_v2_release(model, state, str(p), release if isinstance(release, dict) else {},
                                 skip_visual=skip_visual, prompt_len=prompt_len, vision=vision)
    if fmt == "lavin":
        return import_lavin(model, state, str(p), args=obj.get("args") if isinstance(obj, dict) else None,
                            skip_visual=skip_visual, temperature=temperature, vision=vision)
    raise ValueError(f"{p} is a .pth file; format {fmt!r} is a folder")


def load_adapter(model: LlamaLM, path: str | Path, format: str | None = None, *, tokenizer: Tokenizer | None = None,
                 skip_visual: bool = False, prompt_len: int | None = None, temperature: float | None = None,
                 progress: bool = False, force: bool = False, vision: str | None = None) -> LlamaLM:
    """Load an adapter of any supported format (auto-detected, or `format`, one of FORMATS) onto `model`.

    Options for reference files: `vision` ("clip:<folder>", the CLIP ViT-L/14 they were trained with) maps
    the visual parts of the V2 release and LaVIN, `skip_visual` drops them (one of the two is needed
    when the file has them), `prompt_len` the rows per layer of a release's adapter_query (default 10),
    `temperature` LaVIN's routing temperature. `tokenizer`: the model's (LaVIN needs it). `force`: load our
    adapter even if it names another base model (its tensors must still fit)."""
    if format is not None and not isinstance(format, str):
        raise TypeError(f"format must be a format name ({', '.join(FORMATS)}), got a {type(format).__name__}; "
                        f"pass the tokenizer as tokenizer=")
    p = _normalise(path)
    if p.is_dir():
        verify_checksums(p)  # a damaged file is named as such, before format detection reads it
    if (format or (_folder_format(p, _folder_config(p)) if p.is_dir() else None)) == "ours":
        return own.load_adapter(model, p, tokenizer=tokenizer, force=force)
    imported = import_adapter(model, p, format, skip_visual=skip_visual, prompt_len=prompt_len,
                              temperature=temperature, progress=progress, vision=vision)
    return install(model, imported, str(p), tokenizer)


def save_adapter(model: LlamaLM, folder: str | Path, format: str = "ours") -> Path:
    """Write the attached adapter as our checkpoint ("ours") or as a PEFT folder ("peft": a V1 adapter with
    scalar gates -> AdaptionPrompt, a LoRA-only V2 adapter -> LoRA); other cases are refused with the reason."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if format == "ours":
        return own.save_adapter(model, folder)
    if model.adapter is None:
        raise ValueError("no adapter is attached to this model")
    folder = Path(folder)
    if model.adapter.method == "adapter_v1":
        return export_peft_prompt(model, folder)
    if model.adapter.method == "adapter_v2":
        return export_peft_lora(model, folder)
    raise ValueError(f"PEFT has no format for a {model.adapter.method} adapter (only V1 with scalar gates -> "
                     f"AdaptionPrompt, and V2 with LoRA only -> LoRA)")

"""Convert an adapter between formats: load it onto its base model, write it in the target format."""

from __future__ import annotations

from pathlib import Path

from ..model.load import load_pretrained
from .dispatch import SAVE_FORMATS, _folder_config, _normalise, load_adapter, save_adapter


def base_of(src: str | Path) -> str | None:
    """The base model an adapter folder names (ours: base_model; PEFT: base_model_name_or_path)."""
    p = _normalise(src)
    if not p.is_dir():
        return None
    config = _folder_config(p)
    return config.get("base_model") or config.get("base_model_name_or_path")


def convert(src: str | Path, out: str | Path, base: str | None = None, from_format: str | None = None,
            to: str = "ours", *, skip_visual: bool = False, prompt_len: int | None = None,
            temperature: float | None = None, dtype: str | None = None, progress: bool = True,
            vision: str | None = None) -> Path:
    """Load `src` (any format) onto `base` (default: the base the adapter names) and save it as `to`.

    The reference .pth releases name no base model: pass it (a folder, Meta folder, .gguf or hub id)."""
    if to not in SAVE_FORMATS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"convert would overwrite its source {src}: choose another --out")
    base = base or base_of(src)
    if not base:
        raise ValueError(f"{src} does not name its base model: give it (convert --model BASE)")
    model, tok = load_pretrained(base, dtype=dtype, progress=progress)
    load_adapter(model, src, from_format, tokenizer=tok, skip_visual=skip_visual, prompt_len=prompt_len,
                 temperature=temperature, progress=progress, vision=vision)
    return save_adapter(model, out, to)


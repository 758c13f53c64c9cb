"""Expert models (V2, METHODS.md 2.4): a caption, OCR or detection model turns an image into
text, which enters the instruction's context slot, with no training. Experts are pluggable and
optional: the model works without them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Expert(Protocol):
    """What an expert is: a name and `describe(image) -> text` for the instruction's context."""
    name: str

    def describe(self, image: Any) -> str:
        """Text about `image` (a path or a PIL image); "" when there is nothing to say."""
        ...


def with_context(context: str, expert_texts: list[str]) -> str:
    """The instruction's context (Alpaca's "input") with the experts' texts appended."""
    parts = [context.strip()] if context.strip() else []
    parts += [t.strip() for t in expert_texts if t and t.strip()]
    return "\n".join(parts)


def expert_prompt_ids(tok: Any, instruction: str, image: Any, experts: list[Expert], template: str,
                      context: str = "") -> list[int]:
    """The instruction rendered with the experts' texts about `image` in its context slot."""
    from ..data.templates import render_prompt

    texts = [e.describe(image) for e in experts] if image is not None else []
    text, special = render_prompt(template, tok, instruction, with_context(context, texts))
    return tok.encode(text, add_special_tokens=special)


def load_expert(spec: str) -> Expert:
    """"ocr", "caption:ADAPTER_DIR" or "precomputed:FILE.json"."""
    kind, _, arg = spec.partition(":")
    if kind == "ocr" and not arg:
        from .ocr import OCRExpert

        return OCRExpert()
    if kind == "caption" and arg:
        from .caption import AdapterCaptionExpert

        return AdapterCaptionExpert(Path(arg))
    if kind == "precomputed" and arg:
        from .precomputed import PrecomputedExpert

        return PrecomputedExpert(Path(arg))
    raise ValueError(f"unknown expert {spec!r}: use ocr, caption:ADAPTER_DIR or precomputed:FILE.json")

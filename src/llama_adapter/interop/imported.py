"""What an importer produces, and the one place that checks it and puts it into a model.

Importers are pure functions from a file's tensors to an `Imported`: our method config plus
tensors under our parameter names. Shapes are checked against the base model (the attached
method built on the meta device, which costs no memory) before the model is touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..methods.registry import adapter_tensors, attach
from ..model.llama import LlamaLM
from ..model.load import build_model
from ..model.tokenizer import Tokenizer


@dataclass
class Imported:
    """Our method config, the tensors under our names, and for each our name the file's key (for errors)."""

    config: Any
    tensors: dict[str, torch.Tensor]
    source: dict[str, str]
    notes: list[str] = field(default_factory=list)  # behaviour differences, said as warnings on load


def expect_shape(origin: str, key: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    """A clear error naming the key and the two shapes (`why`: what of the base model sets the shape)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{origin}: {key} has shape {tuple(t.shape)}, but this base model needs {tuple(shape)} "
                         f"({why}); the adapter was made for another model")


def refuse_keys(origin: str, keys: list[str], why: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
        raise ValueError(f"{origin}: cannot load {shown}: {why}")


def visual_keys(origin: str, state: dict[str, torch.Tensor], prefixes: tuple[str, ...], skip_visual: bool,
                vision: str | None, unmapped: Callable[[str], bool], needs_vision: str, not_mapped: str,
                text_only: str) -> tuple[list[str], list[str]]:
    """(the visual keys of a release file, notes): refused without a `vision` encoder to map them onto
    (`needs_vision`), refused where `unmapped` (`not_mapped`), or dropped with a note under `skip_visual`."""
    visual = [k for k in state if k.startswith(prefixes)]
    if not visual:
        return visual, []
    if skip_visual:
        return visual, [f"dropped {len(visual)} visual tensors (skip_visual): {text_only}"]
    if not vision:
        refuse_keys(origin, visual, needs_vision)
    refuse_keys(origin, [k for k in visual if unmapped(k)], not_mapped)
    return visual, []


def shape_why(model: LlamaLM) -> str:
    c = model.config
    return f"dim={c.dim}, n_layers={c.n_layers}, n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}"



def release_prompts(origin: str, query: torch.Tensor, prompt_len: int, model: LlamaLM) -> int:
    """How many top layers a release's `adapter_query.weight` [L * K, C] holds prompts for, after checking
    its shape against the base model (both releases lay their prompts out this way)."""
    c, why = model.config, shape_why(model)
    if query.dim() != 2 or query.shape[0] % prompt_len:
        raise ValueError(f"{origin}: adapter_query.weight has shape {tuple(query.shape)}, not [L * {prompt_len}, C] "
                         f"(prompt_len={prompt_len})")
    n_adapted = query.shape[0] // prompt_len
    expect_shape(origin, "adapter_query.weight", query, (n_adapted * prompt_len, c.dim), why)
    if n_adapted > c.n_layers:
        raise ValueError(f"{origin}: adapter_query.weight holds prompts for {n_adapted} layers, but this base model "
                         f"has {c.n_layers} ({why})")
    return n_adapted

def _resolved(imp: Imported, expected: dict[str, tuple[int, ...]]) -> Imported:
    """Names starting with "*." stand for the one expected name that ends with the rest (the path of a module
    inside a third-party model, such as an encoder block, depends on the transformers version)."""
    rename = {}
    for name in imp.tensors:
        if name.startswith("*."):
            hits = [e for e in expected if e.endswith(name[1:])]
            if len(hits) == 1:
                rename[name] = hits[0]
    if not rename:
        return imp
    tensors = {rename.get(n, n): t for n, t in imp.tensors.items()}
    source = {rename.get(n, n): k for n, k in imp.source.items()}
    return Imported(imp.config, tensors, source, imp.notes)


def install(model: LlamaLM, imp: Imported, origin: str, tokenizer: Tokenizer | None = None) -> LlamaLM:
    """Check every tensor against the method as attached to this base, then attach and copy."""
    if model.adapter is not None:
        raise ValueError(f"cannot load {origin}: a {model.adapter.method} adapter is already attached to this model")
    probe = build_model(model.config, device="meta")
    attach(probe, imp.config, None)
    expected = {n: tuple(t.shape) for n, t in adapter_tensors(probe).items()}
    imp = _resolved(imp, expected)
    unknown = [imp.source.get(n, n) for n in imp.tensors if n not in expected]
    refuse_keys(origin, unknown, "no parameter of the attached method takes them")
    for name, t in imp.tensors.items():
        expect_shape(origin, imp.source.get(name, name), t, expected[name], shape_why(model))
    attach(model, imp.config, tokenizer)
    params = adapter_tensors(model)
    with torch.no_grad():
        for name, t in imp.tensors.items():
            params[name].copy_(t.to(device=params[name].device, dtype=params[name].dtype))
    for note in imp.notes:
        warnings.warn(f"{origin}: {note}", stacklevel=3)
    return model

"""The public API (ARCHITECTURE.md): importable from the package root, every name documented."""

from __future__ import annotations

import dataclasses
import inspect

import llama_adapter as la

# What ARCHITECTURE.md names public: the core calls, the trainer and its config, export, encoders,
# experts, the ScienceQA evaluation and the checkpoint importers.
REQUIRED = {
    "load_pretrained", "attach", "trainable_parameters", "save_adapter", "load_adapter", "generate", "stream",
    "AdapterV1Config", "AdapterV2Config", "LavinConfig", "Trainer", "TrainConfig", "run_recipe", "export_folded",
    "load_encoder", "load_expert", "evaluate_scienceqa", "load_scienceqa",
}


def _own_docstring(obj: object) -> str:
    """The object's docstring, ignoring the signature that dataclasses write when there is none."""
    doc = inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):  # type: ignore[union-attr]
        return ""
    return doc


def test_required_names_are_importable_from_the_root():
    assert REQUIRED <= set(la.__all__)
    assert all(hasattr(la, name) for name in la.__all__)


def test_every_public_name_has_a_docstring():
    undocumented = [name for name in la.__all__ if not _own_docstring(getattr(la, name)).strip()]
    assert undocumented == []

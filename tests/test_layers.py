"""The package's layers (docs/ARCHITECTURE.md, "Layers"): no module imports a layer above its own.

model <- methods <- train/eval/generate <- serve <- cli. The model knows no method, the trainer
no method, data no model but its tokenizer, vision nothing of adapters, and nothing below the
command line imports it. Every import counts: at the top, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llama_adapter"

# Shared low-level modules: every layer may use them; they use only each other.
LOW = {"batch", "checksum", "configs", "device", "fileio"}

# unit (a top-level module or subpackage of llama_adapter) -> what it may import besides itself and LOW.
# An entry with a dot allows one module of a unit only ("model.tokenizer": that module, not the whole model).
ALLOWED: dict[str, set[str]] = {
    **{low: set() for low in LOW},
    "model": set(),  # the model knows no method: it offers hooks and the interface of model/attached.py
    "vision": {"model"},  # image encoders and projectors know nothing of adapters
    "data": {"model.tokenizer"},  # data knows tokenizers, not models
    "loss": {"model"},  # the training loss, shared by train and eval so that neither imports the other
    "methods": {"model", "vision"},
    "generate": {"model", "methods"},
    "train": {"model", "data", "loss"},  # parameter groups and data kinds, never a method
    "experts": {"model", "vision", "data", "methods", "generate"},
    "eval": {"model", "vision", "data", "loss", "methods", "generate", "experts"},
    "interop": {"model", "methods"},  # importers of other checkpoint formats
    "recipe": {"model", "data", "methods", "train"},  # reads recipes: the configs of every part
    "runner": {"model", "data", "methods", "train", "recipe"},
    "sweep": {"model", "data", "loss", "methods", "train", "recipe", "runner", "eval"},  # ablation grids
    "demo": {"model", "vision", "data", "loss", "methods", "generate", "train", "experts", "eval", "recipe",
             "runner"},
    "serve": {"model", "vision", "data", "loss", "methods", "generate", "train", "experts", "eval", "interop",
              "recipe", "runner", "demo", "__init__"},
    "__init__": {"model", "vision", "data", "loss", "methods", "generate", "train", "experts", "eval", "interop",
                 "recipe", "runner", "serve"},  # the public API: everything but the command line
    "cli": {"*"},
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ("llama_adapter", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every llama_adapter import in the file; `from X import name` gives
    X.name, which is a module when name is one, and is checked as X's otherwise."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found += [(node.lineno, f"{source}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name == "llama_adapter" or name.startswith("llama_adapter.")]


def allowed(importer: str, target: str) -> bool:
    src, dst = unit_of(importer), unit_of(target)
    rule = ALLOWED[src]
    if dst == src or dst in LOW or "*" in rule or dst in rule:
        return True
    inner = target.split(".")[1:]  # e.g. ["model", "tokenizer", "Tokenizer"]
    return any(".".join(inner[:k]) in rule for k in range(2, len(inner) + 1))


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for line, target in imported_modules(path, root):
            if not allowed(importer, target):
                out.append(f"{path.relative_to(root.parent)}:{line}: {unit_of(importer)} imports {target} "
                           f"({unit_of(target)} is not below it)")
    return out


def test_every_unit_of_the_package_has_a_place_in_the_table():
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                       if (p / "__init__.py").is_file()}
    unknown = sorted(units - set(ALLOWED))
    assert not unknown, (f"new top-level module(s) or subpackage(s) {unknown}: add each to ALLOWED in "
                         f"tests/test_layers.py with the layers it may import (docs/ARCHITECTURE.md, 'Layers')")
    for rule in ALLOWED.values():
        assert all(r == "*" or r.split(".")[0] in ALLOWED for r in rule)


def test_no_layer_imports_one_above_it():
    bad = violations()
    assert not bad, "imports against the layers (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_nothing_below_the_command_line_imports_it():
    assert [u for u, rule in ALLOWED.items() if "cli" in rule or ("*" in rule and u != "cli")] == []


@pytest.mark.parametrize(("importer", "target", "ok"), [
    ("llama_adapter.model.fastpath", "llama_adapter.methods.registry", False),  # the model knows no method
    ("llama_adapter.train.trainer", "llama_adapter.methods.io.save_adapter", False),
    ("llama_adapter.eval.nll", "llama_adapter.train.trainer.lm_loss", False),
    ("llama_adapter.eval.nll", "llama_adapter.loss.lm_loss", True),
    ("llama_adapter.data.tokenize", "llama_adapter.model.tokenizer.Tokenizer", True),
    ("llama_adapter.data.tokenize", "llama_adapter.model.llama.LlamaLM", False),
    ("llama_adapter.data.tokenize", "llama_adapter.model.Tokenizer", False),  # model/__init__ is all of the model
    ("llama_adapter.vision.encoders", "llama_adapter.methods.lavin", False),
    ("llama_adapter.methods.visual", "llama_adapter.generate.PreparedBatch", False),
    ("llama_adapter.methods.visual", "llama_adapter.batch.PreparedBatch", True),
    ("llama_adapter.generate", "llama_adapter.cli", False),
    ("llama_adapter.serve.app", "llama_adapter.cli.main", False),
    ("llama_adapter.cli", "llama_adapter.runner.run_recipe", True),
])
def test_the_rule_itself(importer, target, ok):
    assert allowed(importer, target) is ok


def test_imports_inside_functions_and_relative_ones_are_seen(tmp_path):
    pkg = tmp_path / "llama_adapter"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from ..methods import registry\n"
                                        "def f():\n    from llama_adapter.train.trainer import Trainer\n"
                                        "from . import llama\n")
    assert sorted(imported_modules(pkg / "model" / "x.py", pkg)) == [
        (3, "llama_adapter.methods.registry"), (5, "llama_adapter.train.trainer.Trainer"),
        (6, "llama_adapter.model.llama")]
    bad = violations(pkg)
    assert len(bad) == 2 and "model imports llama_adapter.methods.registry" in bad[0]

"""Recipes: a YAML file (model, method, data, train) overridable from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .configs import build_config
from .data.sources import DataConfig
from .methods.registry import config_from_dict
from .model.config import ModelConfig
from .model.quantize import check_quantize
from .train.config import TrainConfig

# Shapes of published models, so that parameter counts need no weights (meta device).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-65b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffn_dim=22016),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
}


@dataclass
class Recipe:
    """A training run as data: the base model, the method's options, the data sources and the train settings."""

    model: str = "smollm2-135m"
    shape: str | None = None  # a key of SHAPES, for counting without weights
    # "int8"/"int4": the base's block linears packed at load time (model/quantize.py); written in YAML as
    # `model: {name: ..., quantize: int8}` or overridden with `model.quantize=int8`
    quantize: str | None = None
    method: dict[str, Any] = field(default_factory=lambda: {"name": "adapter_v1"})
    data: list[DataConfig] = field(default_factory=list)  # one or more sources, each of a data kind
    train: TrainConfig = field(default_factory=TrainConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (paper, source)

    def method_config(self) -> Any:
        values = dict(self.method)
        name = values.pop("name", None)
        if not name:
            raise ValueError("recipe: method.name is missing")
        return config_from_dict(name, values)

    def model_config(self) -> ModelConfig:
        if self.shape:
            if self.shape not in SHAPES:
                raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
            return ModelConfig(**SHAPES[self.shape])
        from .model.config import read_hf_config
        from .model.load import resolve_model_path

        return read_hf_config(resolve_model_path(self.model))

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        quantize = tree.pop("quantize")
        if quantize is not None:
            tree["model"] = {"name": self.model, "quantize": quantize}
        return tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c=value`; a list (several data sources) is indexed by number: `data.1.train=...`."""
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        key: str | int = k
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ValueError(f"override {dotted!r}: {k!r} is not an index of the {len(node)} entries")
            key = int(k)
        elif not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {keys[i - 1]!r} is not a section")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def _as_list(section: Any) -> list[dict[str, Any]]:
    if section is None:
        return []
    if isinstance(section, dict):
        return [section]
    if isinstance(section, list) and all(isinstance(d, dict) for d in section):
        return section
    raise ValueError("data: a mapping (one source) or a list of mappings (several sources)")


def _model_section(section: Any) -> tuple[str, str | None]:
    """`model:` as a name, or a mapping {name, quantize}: (name, validated quantize)."""
    if not isinstance(section, dict):
        return str(section), None
    unknown = set(section) - {"name", "quantize"}
    if unknown:
        raise ValueError(f"section 'model': unknown key(s) {sorted(unknown)}; known: name, quantize")
    return str(section.get("name", "smollm2-135m")), check_quantize(section.get("quantize"))


def recipe_from_dict(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    tree = dict(tree)
    unknown = set(tree) - {f.name for f in dataclasses.fields(Recipe)} | ({"quantize"} & set(tree))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}")
    try:
        model, quantize = _model_section(tree.get("model", "smollm2-135m"))
        recipe = Recipe(
            model=model,
            quantize=quantize,
            shape=tree.get("shape"),
            method=dict(tree.get("method") or {"name": "adapter_v1"}),
            data=[build_config(DataConfig, dict(d), "section 'data'") for d in _as_list(tree.get("data"))],
            train=build_config(TrainConfig, dict(tree.get("train") or {}), "section 'train'"),
            extra=dict(tree.get("extra") or {}),
        )
        recipe.method_config()  # validate now, with the recipe's name in the message
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """A recipe from a YAML file (or none: the defaults) with `section.key=value` overrides applied, validated."""
    tree: dict[str, Any] = {}
    source = "command line"
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ValueError(f"{p}: a recipe is a mapping with sections model, method, data, train")
        source = str(p)
    for key, value in parse_overrides(overrides or []):
        if key.startswith("model.") and not isinstance(tree.get("model"), dict):  # model: NAME becomes a section
            tree["model"] = {"name": tree.get("model", "smollm2-135m")}
        _set_dotted(tree, key, value)
    return recipe_from_dict(tree, source)

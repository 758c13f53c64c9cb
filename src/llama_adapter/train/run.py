"""Run a recipe end to end: load the base model, attach the method, load data, train."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..data.multimodal import collate_multimodal
from ..data.sources import load_source
from ..data.tokenize import Example
from ..fileio import atomic_write_text
from ..methods.registry import attach, count_trainable
from ..model.load import load_pretrained
from ..recipe import Recipe
from .trainer import Trainer, TrainResult


def run_recipe(recipe: Recipe):
    """Train as the recipe says; returns (result, model, tokenizer)."""
    torch.manual_seed(recipe.train.seed)
    model, tok = load_pretrained(recipe.model, device=recipe.train.device)
    attach(model, recipe.method_config())
    if not recipe.data:
        raise ValueError("the recipe has no data section")
    train: dict[str, list[Example]] = {}
    val: list[Example] = []
    for source in recipe.data:
        t, v = load_source(source, tok)
        train.setdefault(source.kind, []).extend(t)
        val.extend(v)
    multimodal = any(source.format != "alpaca" for source in recipe.data)
    out = Path(recipe.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    collate_fn = (lambda ex: collate_multimodal(ex, tok.pad_id)) if multimodal else None
    trainer = Trainer(model, recipe.train, train, val, pad_id=tok.pad_id, collate_fn=collate_fn)
    if trainer.dist.main:
        counts = ", ".join(f"{len(v)} {k}" for k, v in train.items())
        print(f"{recipe.method['name']}: {count_trainable(model):,} trainable parameters; "
              f"{counts} training / {len(val)} validation examples; {trainer.total_steps} steps "
              f"in {'bf16 autocast' if trainer.amp_dtype else 'fp32'} on {trainer.device} -> {out}", flush=True)
    result: TrainResult = trainer.fit()
    return result, model, tok

"""Run a recipe end to end: load the base model, attach the method, load data, train."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..data.instructions import load_instruction_data
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
    train, val = load_instruction_data(recipe.data, tok)
    out = Path(recipe.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    trainer = Trainer(model, recipe.train, {"instruction": train}, val, pad_id=tok.pad_id)
    if trainer.dist.main:
        print(f"{recipe.method['name']}: {count_trainable(model):,} trainable parameters; "
              f"{len(train)} training / {len(val)} validation examples; {trainer.total_steps} steps "
              f"-> {out}", flush=True)
    result: TrainResult = trainer.fit()
    return result, model, tok

"""Run a recipe end to end: load the base model, attach the method, load data, train.

It sits beside recipe.py, above the trainer: the trainer knows parameter groups and data
kinds, this module knows which method and which model a recipe names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from .batch import Example
from .data.multimodal import collate_multimodal
from .data.sources import load_source
from .fileio import atomic_write_text
from .methods.registry import attach, count_trainable
from .model.llama import LlamaLM
from .model.load import build_model, load_pretrained
from .model.tokenizer import Tokenizer
from .recipe import Recipe
from .train.trainer import Trainer, TrainResult


def run_recipe(recipe: Recipe) -> tuple[TrainResult, LlamaLM, Tokenizer]:
    """Train as the recipe says; returns (result, model, tokenizer)."""
    torch.manual_seed(recipe.train.seed)
    model, tok = load_pretrained(recipe.model, device=recipe.train.device, quantize=recipe.quantize)
    attach(model, recipe.method_config(), tokenizer=tok)
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
    return trainer.fit(), model, tok


def parameter_counts(recipe: Recipe) -> dict[str, Any]:
    """{method, trainable, groups: {group: count}, base}: the recipe's parameter counts, on the meta
    device (no weights are read, so the paper-sized shapes count on any machine)."""
    model = build_model(recipe.model_config(), device="meta")
    base = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        attach(model, recipe.method_config())
    params = dict(model.named_parameters())
    groups = {g: sum(params[n].numel() for n in names) for g, names in model.adapter.groups.items()}
    return {"method": recipe.method["name"], "trainable": count_trainable(model), "groups": groups, "base": base}


def recipe_memory(recipe: Recipe, devices: int) -> dict[str, Any]:
    """The recipe's estimated memory per device (train/memory.py), with the base replicated and with
    it sharded over `devices` (FSDP2), at the recipe's batch and longest data max_len; no weights read."""
    from .train.memory import memory_table, split_parameters

    model = build_model(recipe.model_config(), device="meta")
    with torch.device("meta"):
        attach(model, recipe.method_config())
    seq_len = max((d.max_len for d in recipe.data), default=512)
    split = split_parameters(model, set(model.adapter.trainable_parameters(model)))
    return {"seq_len": seq_len, "batch_size": recipe.train.batch_size,
            "activation_checkpointing": recipe.train.activation_checkpointing,
            "per_device_gib": memory_table(model.config, split, recipe.train, seq_len, devices)}

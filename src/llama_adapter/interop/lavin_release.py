"""LaVIN checkpoints (checkpoint-N.pth: {'model', 'optimizer', 'epoch', 'scaler', 'args'}, keys with or
without `module.`).

What maps onto our LaVIN (text path), per layer i: `layers.{i}.adapter_attn` -> the adapter before
attention (`adapter_mlp`, when present, -> the one before the feed-forward network):
conv_A [r, C, 1] (+ bias) -> down; conv_B / conv_D [C, r/g, 1] (+ bias), grouped convolutions,
-> the two grouped up-projections up0 / up1; expert_weights [2, C] (+ bias) -> the router;
`adapter_modality_embedding` [2, C] -> the modality embeddings (0 text-only, 1 with image).
The routing temperature comes from the run's args (`temperature`), else from the model width
(10 for 4096, 5 for 5120, as the paper), or the `temperature=` option.

The visual side maps with `vision="clip:<CLIP ViT-L/14 folder>"` (LaVIN reads CLIP from OpenAI's
package, not from the checkpoint): `backbone.visual.transformer.resblocks.{j}.adapter_attn.*` -> the
MM-adapter before the attention of CLIP block j (our encoder's pre-attention adapters, same tensor
mapping as the language model's), routed per example from that example's own [CLS] state (the
paper; the reference code's ViT router reads a batch row instead, METHODS.md 5: said in a warning);
the neck `adapter_proj.conv_A` / `conv_B` (Linear or k=1 conv weights) -> our LavinNeck's down / up
with SiLU between (LaVIN's neck). Without `vision` they are refused; `skip_visual=True` loads a
text-only LaVIN.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..methods.lavin import LavinConfig
from ..model.llama import LlamaLM
from .imported import Imported, expect_shape, refuse_keys, shape_why, visual_keys

ADAPTER = re.compile(r"layers\.(\d+)\.(adapter_attn|adapter_mlp)\.(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)")
SLOTS = {"adapter_attn": "attn_adapter", "adapter_mlp": "ffn_adapter"}
PARTS = {"conv_A": "down", "conv_B": "up0", "conv_D": "up1", "expert_weights": "router"}
VISUAL_PREFIXES = ("backbone.", "adapter_proj.", "visual.")
VIT_ADAPTER = re.compile(r"backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_attn\."
                         r"(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)")
NECK = re.compile(r"adapter_proj\.(conv_A|conv_B)\.(weight|bias)")
VIT_BLOCKS = "*.encoder.layers"  # our CLIPEncoder's blocks, wherever transformers puts them (see imported.py)
MODALITY = "adapter_modality_embedding.weight"


def is_lavin(state: dict[str, torch.Tensor]) -> bool:
    return MODALITY in state or any(ADAPTER.fullmatch(k) for k in state)


def _temperature(dim: int, args: Any, given: float | None) -> tuple[float, str | None]:
    if given is not None:
        return float(given), None
    from_args = getattr(args, "temperature", None) if args is not None else None
    if from_args is not None:
        return float(from_args), None
    guess = {4096: 10.0, 5120: 5.0}.get(dim, 10.0)
    return guess, (f"no routing temperature in the checkpoint's args: using {guess} (the paper's for this width); "
                   f"pass temperature= to override")


def import_lavin(model: LlamaLM, state: dict[str, torch.Tensor], origin: str, args: Any = None,
                 skip_visual: bool = False, temperature: float | None = None, scale: float | None = None,
                 vision: str | None = None) -> Imported:
    c, why = model.config, shape_why(model)
    visual, notes = visual_keys(
        origin, state, VISUAL_PREFIXES, skip_visual, vision,
        unmapped=lambda k: not (VIT_ADAPTER.fullmatch(k) or NECK.fullmatch(k)),
        needs_vision="LaVIN's visual side (MM-adapters inside CLIP ViT-L/14 and the adapter_proj neck) needs the "
                     "CLIP it was trained with: pass vision='clip:<folder>' (convert: --vision) to map it, or "
                     "skip_visual=True (convert: --skip-visual) to load a text-only LaVIN",
        not_mapped="not part of LaVIN's visual side as mapped here (ViT adapters adapter_attn, the adapter_proj "
                   "neck); CLIP's own weights are read from the vision folder",
        text_only="a text-only LaVIN")
    unknown = [k for k in state if k not in visual and k != MODALITY and not ADAPTER.fullmatch(k)]
    refuse_keys(origin, unknown, "not part of a LaVIN checkpoint as mapped here (adapters, router, modality "
                "embedding)")
    found = {m.groups(): t for k, t in state.items() if (m := ADAPTER.fullmatch(k))}
    if not found:
        raise ValueError(f"{origin}: no LaVIN adapters (layers.N.adapter_attn.*) in the checkpoint")
    first = next(t for (_, _, part, kind), t in found.items() if part == "conv_A" and kind == "weight")
    rank = first.shape[0]
    up = next(t for (_, _, part, kind), t in found.items() if part == "conv_B" and kind == "weight")
    if up.dim() != 3 or up.shape[1] < 1 or rank % up.shape[1]:
        raise ValueError(f"{origin}: conv_B.weight has shape {tuple(up.shape)}, not [C, r/groups, 1] with r={rank}")
    groups = rank // up.shape[1]
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    prefix = "module." if any(k.startswith("module.") for k in state) else ""
    expected = {("conv_A", "weight"): (rank, c.dim, 1), ("conv_A", "bias"): (rank,),
                ("conv_B", "weight"): (c.dim, rank // groups, 1), ("conv_B", "bias"): (c.dim,),
                ("conv_D", "weight"): (c.dim, rank // groups, 1), ("conv_D", "bias"): (c.dim,),
                ("expert_weights", "weight"): (2, c.dim), ("expert_weights", "bias"): (2,)}
    for (i, slot, part, kind), t in found.items():
        key = f"{prefix}layers.{i}.{slot}.{part}.{kind}"
        if int(i) >= c.n_layers:
            raise ValueError(f"{origin}: {key} is for layer {i}, but this base model has {c.n_layers} layers ({why})")
        expect_shape(origin, key, t, expected[(part, kind)], f"{why}, rank={rank}, groups={groups}")
        if part in ("conv_B", "conv_D") and kind == "weight":
            t = t[..., 0].reshape(groups, c.dim // groups, rank // groups)
        elif part == "conv_A" and kind == "weight":
            t = t[..., 0]
        ours = f"layers.{i}.{SLOTS[slot]}.{PARTS[part]}.{kind}"
        tensors[ours], source[ours] = t, key
    if MODALITY in state:
        expect_shape(origin, MODALITY, state[MODALITY], (2, c.dim), why)
        tensors["lavin.modality.weight"], source["lavin.modality.weight"] = state[MODALITY], MODALITY
    tau, note = _temperature(c.dim, args, temperature)
    if note:
        notes.append(note)
    cfg_scale = scale if scale is not None else float(getattr(args, "adapter_scale", 1.0) if args is not None else 1.0)
    ffn = any(slot == "adapter_mlp" for _, slot, _, _ in found)
    cfg = LavinConfig(rank=rank, groups=groups, temperature=tau, scale=cfg_scale, ffn_adapter=ffn, vision=None)
    if visual and not skip_visual:
        cfg = _visual_side(cfg, state, origin, prefix, str(vision), groups, tensors, source, notes)
    return Imported(cfg, tensors, source, notes)


def _visual_side(cfg: LavinConfig, state: dict[str, torch.Tensor], origin: str, prefix: str, vision: str,
                 groups: int, tensors: dict[str, torch.Tensor], source: dict[str, str],
                 notes: list[str]) -> LavinConfig:
    """Map the ViT adapters and the neck into `tensors` (shapes are checked on install); the config with vision."""
    vit = False
    for key, t in state.items():
        if m := VIT_ADAPTER.fullmatch(key):
            j, part, kind = m.groups()
            if part in ("conv_B", "conv_D") and kind == "weight":
                if t.dim() != 3 or t.shape[0] % groups:
                    raise ValueError(f"{origin}: {prefix}{key} has shape {tuple(t.shape)}, not [width, r/groups, 1] "
                                     f"with groups={groups}")
                t = t[..., 0].reshape(groups, t.shape[0] // groups, t.shape[1])
            elif part == "conv_A" and kind == "weight":
                t = t[..., 0] if t.dim() == 3 else t
            ours = f"{VIT_BLOCKS}.{j}.pre_attention_adapter.{PARTS[part]}.{kind}"
            tensors[ours], source[ours], vit = t, prefix + key, True
    neck = {m.groups(): t for k, t in state.items() if (m := NECK.fullmatch(k))}
    if ("conv_A", "weight") not in neck or ("conv_B", "weight") not in neck:
        raise ValueError(f"{origin}: the neck {prefix}adapter_proj.conv_A / conv_B weights are missing: images cannot "
                         f"be mapped to visual tokens without them")
    down = neck[("conv_A", "weight")]
    down = down[..., 0] if down.dim() == 3 else down
    if down.dim() != 2:
        raise ValueError(f"{origin}: {prefix}adapter_proj.conv_A.weight has shape {tuple(down.shape)}, not "
                         f"[hidden, width] (or [hidden, width, 1])")
    hidden, width = down.shape
    for (part, kind), t in neck.items():
        t = t[..., 0] if kind == "weight" and t.dim() == 3 else t
        ours = f"lavin.neck.down.{width}.{kind}" if part == "conv_A" else f"lavin.neck.up.{kind}"
        tensors[ours], source[ours] = t, f"{prefix}adapter_proj.{part}.{kind}"
    notes.append("visual tokens: the adapter_proj neck (Linear, SiLU, Linear) on the [CLS] state after every fourth "
                 "CLIP block" + ("; the CLIP adapters route per example from that example's own [CLS] (the paper), "
                                 "where LaVIN's code reads one batch row for all (METHODS.md 5): the same for a "
                                 "single image" if vit else ""))
    return dataclasses.replace(cfg, vision=vision, vision_adapters=vit, neck_hidden=int(hidden))

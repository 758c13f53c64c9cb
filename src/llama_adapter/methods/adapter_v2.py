"""LLaMA-Adapter V2 (METHODS.md section 2).

- Bias tuning: every linear of every block gets a per-channel scale (init 1) and bias (init
  0), y = s (W x + b), and every RMSNorm weight trains; optional LoRA on chosen linears. All of
  it folds into the weights afterwards (`la.fold`).
- Late instruction prompts (zero-gated adaption prompts) in the last L layers.
- Early fusion: with an image encoder, visual tokens (learnable queries mixed with the
  encoder's token grid, then mapped to the model width) plus a learned prompt form a gated
  prefix of their own in the first E layers only, E + L <= N, so the two never share a layer.
  The visual prefix acts only on examples that have an image.
- Release compatibility (importing the V2 multimodal release): `visual_fusion="all_layers"` adds the
  visual tokens to the instruction prompts of every adapted layer instead, and
  `visual_projector="release"` is the release's projector on CLIP's projected tokens.
- Disjoint groups for joint training: "visual" (projector, early prompts and gates) is trained
  by image batches (data kinds caption, vqa); "instruction" (late prompts and gates, norms,
  scales, biases, LoRA) by text instruction batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..model.llama import AdaptableLinear, Block, LlamaLM
from ..vision import ReleaseQueryProjector, VisualQueryProjector, projected_clip_spec
from .adapter_v1 import attach_prompts
from .lora import LoRA
from .prefix import GatedPrefix, check_prompt_options
from .registry import Attached, Method, register
from .visual import VisualFrontend, install_visual, visual_preparers

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISUAL_TOKENS, VISUAL_ROWS = "visual_tokens", "visual_rows"
VISUAL_FUSIONS = ("early", "all_layers")
VISUAL_PROJECTORS = ("queries", "release")


@dataclass
class AdapterV2Config:
    """LLaMA-Adapter V2: bias tuning, late instruction prompts, early-fused visual prompts (with `vision`),
    disjoint groups for joint training. Ablations (off by default): `init`, `joint` (docs/ablations.md)."""

    prompt_len: int = 10  # late instruction prompts, K
    n_layers: int | None = None  # L: adapted top layers; None: all but the first max(E, 2)
    gate: str = "per_head_tanh"
    bias_scale: bool = True  # per-channel scale and bias on all seven linears of every block
    norms: bool = True  # unfreeze every RMSNorm weight
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LINEARS
    vision: str | None = None  # image encoder spec; enables early fusion of visual tokens
    visual_layers: int = 1  # E: the first E layers get the visual prefix
    visual_queries: int = 10
    visual_blocks: int = 2
    visual_width: int | None = 256  # width of the query blocks (None: the encoder's token width; 768 in the paper)
    visual_lr_scale: float = 1.0  # the visual group's learning rate relative to the instruction group's
    projector_lr_scale: float = 1.0  # the query projector's, relative to the rest of the visual group
    # Multiplier of the visual prefix before the first layers' key/value projections; None: the RMS
    # of that layer's input-norm weight, the scale of the inputs those projections normally see
    visual_prompt_scale: float | None = None
    feature_cache: bool = True
    # Compatibility with the V2 multimodal release (METHODS.md 5), not the paper's design:
    # "all_layers" adds the visual tokens to the instruction prompts of every adapted layer (no early
    # prefix; needs visual_queries == prompt_len); "release" is the release's projector
    # (ReleaseQueryProjector, on CLIP's projected tokens: vision must be a CLIP folder).
    visual_fusion: str = "early"
    visual_projector: str = "queries"
    visual_heads: int | None = None  # heads of the query blocks; None: width // 64 ("queries"), 16 ("release")
    # Ablations (docs/ablations.md); the defaults are the method. init "random": every gated prefix (late
    # instruction and early visual) starts with its gate open, the paper's rand-init attention. joint False:
    # no disjoint groups, every batch of any kind trains both groups. (The paper's early-fusion depth E is
    # `visual_layers` above: the ablation "early_fusion_layers" is method.visual_layers.)
    init: str = "zero"
    joint: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.joint, bool):
            raise ValueError(f"joint must be true or false (on/off), got {self.joint!r}")
        self.lora_targets = tuple(self.lora_targets)
        if self.visual_fusion not in VISUAL_FUSIONS:
            raise ValueError(f"visual_fusion must be one of {', '.join(VISUAL_FUSIONS)}, got {self.visual_fusion!r}")
        if self.visual_projector not in VISUAL_PROJECTORS:
            raise ValueError(f"visual_projector must be one of {', '.join(VISUAL_PROJECTORS)}, "
                             f"got {self.visual_projector!r}")
        if self.vision and self.visual_fusion == "all_layers" and self.visual_queries != self.prompt_len:
            raise ValueError(f"visual_fusion 'all_layers' adds the {self.visual_queries} visual tokens to prompts of "
                             f"{self.prompt_len} rows: visual_queries must equal prompt_len")
        if self.vision and self.visual_projector == "release":
            projected_clip_spec(self.vision)  # the release's projector reads CLIP's projected tokens
        check_prompt_options(self.prompt_len, self.n_layers, self.gate, min_layers=0,  # L = 0: bias tuning only
                             init=self.init)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        unknown = set(self.lora_targets) - set(LINEARS)
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose among {', '.join(LINEARS)}")
        if self.vision and self.visual_fusion == "early" and self.visual_layers < 1:
            raise ValueError(f"visual_layers must be >= 1 with an image encoder, got {self.visual_layers}")
        if self.visual_prompt_scale is not None and not self.visual_prompt_scale > 0:
            raise ValueError(f"visual_prompt_scale must be > 0 (or None: automatic), got {self.visual_prompt_scale}")

    def layer_split(self, model_layers: int) -> tuple[range, range]:
        """(early visual layers, late instruction layers) of a model with N = `model_layers` layers, refused
        when they would overlap or not fit, or when the default L leaves no layer for instruction prompts.
        `attach` calls it first: the config alone does not know N."""
        early = self.visual_layers if self.vision and self.visual_fusion == "early" else 0
        if early > model_layers:
            raise ValueError(f"visual_layers E={early} exceeds the model's N={model_layers} layers: choose E and "
                             f"n_layers L with E + L <= N (L >= 1 for instruction prompts, 0 for none)")
        if self.n_layers is None:
            late = model_layers - max(early, 2)
            if late < 1:
                raise ValueError(
                    f"visual_layers E={early} leaves no layer for the instruction prompts on the model's "
                    f"N={model_layers} layers: the default n_layers L = {model_layers} - max(E, 2) = {late}; "
                    f"lower E or set n_layers (L >= 1 with E + L <= N, or L = 0 for no instruction prompts)")
        else:
            late = self.n_layers
        if early + late > model_layers:
            raise ValueError(f"visual_layers E={early} + n_layers L={late} exceeds the model's N={model_layers} "
                             f"layers: early visual prompts and late instruction prompts must not share a layer")
        return range(0, early), range(model_layers - late, model_layers)

    def after_fold(self) -> AdapterV2Config:
        """What remains once scales, biases, LoRA and norms are part of the base weights."""
        return dataclasses.replace(self, bias_scale=False, norms=False, lora_rank=0)


def _linears(model: LlamaLM):
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            parent = layer.self_attn if name in LINEARS[:4] else layer.mlp
            prefix = "self_attn" if name in LINEARS[:4] else "mlp"
            yield f"layers.{i}.{prefix}.{name}", getattr(parent, name)


def attach_bias_tuning(model: LlamaLM, cfg: AdapterV2Config) -> list[str]:
    names = []
    for path, lin in _linears(model):
        assert isinstance(lin, AdaptableLinear)
        dev = lin.weight.device
        if cfg.bias_scale:
            lin.scale = nn.Parameter(torch.ones(lin.out_features, device=dev))
            lin.delta_bias = nn.Parameter(torch.zeros(lin.out_features, device=dev))
            names += [f"{path}.scale", f"{path}.delta_bias"]
        if cfg.lora_rank and path.rsplit(".", 1)[-1] in cfg.lora_targets:
            lin.lora = LoRA(lin.in_features, lin.out_features, cfg.lora_rank, cfg.lora_alpha, device=dev)
            names += [f"{path}.lora.A", f"{path}.lora.B"]
    if cfg.norms:
        names += [n for n, _ in model.named_parameters() if n.endswith("layernorm.weight") or n == "norm.weight"]
    return names


def _visual_prompt_scale(model: LlamaLM, layer: int, fixed: float | None) -> float:
    """The visual prompt (N(0, 1) prompt + LayerNorm-ed visual tokens) enters the first layers,
    whose normalised inputs can be far smaller (RMS 0.05 in SmolLM2's layer 0): unscaled, its
    values are 26x the layer's own there and its zero-init gate stays near zero."""
    if fixed is not None:
        return fixed
    weight = cast(Block, model.layers[layer]).input_layernorm.weight
    return 1.0 if weight.is_meta else weight.detach().float().pow(2).mean().sqrt().item()


def attach(model: LlamaLM, cfg: AdapterV2Config) -> Attached:
    early, late = cfg.layer_split(model.config.n_layers)
    instruction = attach_bias_tuning(model, cfg)
    all_layers = bool(cfg.vision) and cfg.visual_fusion == "all_layers"
    instruction += attach_prompts(model, late, cfg.prompt_len, cfg.gate, VISUAL_TOKENS if all_layers else None,
                                  init=cfg.init)
    if not cfg.vision:
        return Attached("adapter_v2", cfg, groups={"instruction": instruction})

    release = cfg.visual_projector == "release"
    frontend = VisualFrontend(projected_clip_spec(cfg.vision) if release else cfg.vision,
                              cfg.feature_cache).to(model.device)
    enc = frontend.encoder
    proj: nn.Module
    if release:
        proj = ReleaseQueryProjector(enc.token_dim, model.config.dim, n_queries=cfg.visual_queries,
                                     n_blocks=cfg.visual_blocks, n_heads=cfg.visual_heads or 16,
                                     width=cfg.visual_width)
    else:
        proj = VisualQueryProjector(enc.token_dim, model.config.dim, n_queries=cfg.visual_queries,
                                    n_blocks=cfg.visual_blocks, n_heads=cfg.visual_heads, width=cfg.visual_width)
    proj = proj.to(model.device)
    visual, buffers = install_visual(model, frontend, proj)
    for i in early:
        visual += attach_prompts(model, range(i, i + 1), cfg.visual_queries, cfg.gate, VISUAL_TOKENS,
                                 _visual_prompt_scale(model, i, cfg.visual_prompt_scale), init=cfg.init)
        cast(GatedPrefix, cast(Block, model.layers[i]).self_attn.prefix).row_key = VISUAL_ROWS
        buffers.append(f"layers.{i}.self_attn.prefix.input_scale")

    def extras(images, batch_size: int) -> dict:
        feats, has = frontend.features(images, batch_size, model.device)
        if feats is None:
            return {}
        tokens = proj(feats)
        if all_layers:  # rows without an image keep their plain instruction prompts
            return {VISUAL_TOKENS: tokens * has[:, None, None].to(tokens.dtype)}
        return {VISUAL_TOKENS: tokens, VISUAL_ROWS: has}

    prepare_inputs, prepare_batch = visual_preparers(extras)
    return Attached("adapter_v2", cfg, groups={"instruction": instruction, "visual": visual},
                    kind_groups=({"instruction": ["instruction"], "caption": ["visual"], "vqa": ["visual"]}
                                 if cfg.joint else {}),
                    lr_scale={"visual": cfg.visual_lr_scale}, prefix_lr_scale={"visual.proj.": cfg.projector_lr_scale},
                    buffers=buffers, prepare_inputs=prepare_inputs, prepare_batch=prepare_batch)


METHOD = register(Method("adapter_v2", AdapterV2Config, attach))

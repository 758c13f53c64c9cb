"""LLaMA-Adapter (V1): gated adaption prompts in the top L layers (METHODS.md section 1),
and its multimodal variant: one projected visual token added to every adapted prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..model.llama import Block, LlamaLM
from ..vision import GlobalMLPProjector
from .prefix import GatedPrefix, check_prompt_options
from .registry import Attached, Method, register
from .visual import VisualFrontend, install_visual, visual_preparers

VISUAL_KEY = "visual_global"


@dataclass
class AdapterV1Config:
    """LLaMA-Adapter V1: K prompts in the top L layers with zero-init gates; `vision` adds the multimodal variant.
    Ablations (off by default): `init`, `prompt`/`prompt_hidden` (docs/ablations.md)."""

    prompt_len: int = 10
    n_layers: int | None = None  # adapted top layers; None: all but the first two
    gate: str = "per_head_tanh"  # or "per_head", "scalar_tanh", "scalar" (PEFT-compatible)
    vision: str | None = None  # an image encoder ("efficientnet-lite0", "clip:DIR", ...): the multimodal variant
    visual_hidden: int = 256  # hidden width of the projection MLP
    visual_norm: bool = True  # a LayerNorm on the projected token: the prompts' scale from the start
    visual_lr_scale: float = 1.0  # the projector's learning rate relative to the prompts'
    feature_cache: bool = True  # keep the frozen encoder's features on disk (later epochs skip the encoder)
    # Ablations (docs/ablations.md); the defaults are the method. init "random": the paper's rand-init
    # attention (gates start open, not at zero). prompt "mlp": prompts = MLP(learned seed), hidden width
    # prompt_hidden (later work's "non-linear prompts"; the zero gates keep it a no-op at step 0).
    init: str = "zero"
    prompt: str = "linear"
    prompt_hidden: int = 64

    def __post_init__(self) -> None:
        check_prompt_options(self.prompt_len, self.n_layers, self.gate, min_layers=1, init=self.init,
                             prompt=self.prompt, prompt_hidden=self.prompt_hidden)

    def adapted_layers(self, model_layers: int) -> range:
        n = self.n_layers if self.n_layers is not None else max(model_layers - 2, 1)
        if n > model_layers:
            raise ValueError(f"n_layers={n} adapted layers, but the model has only {model_layers}")
        return range(model_layers - n, model_layers)


def attach_prompts(model: LlamaLM, layers: range, prompt_len: int, gate: str,
                   add_key: str | None = None, input_scale: float = 1.0, init: str = "zero",
                   prompt: str = "linear", prompt_hidden: int = 64) -> list[str]:
    """Give each layer in `layers` a gated prefix; return the new parameter names
    (prompt and gate; with `prompt="mlp"`, the prompt's seed and MLP instead of the prompt)."""
    cfg = model.config
    names = []
    for i in layers:
        prefix = GatedPrefix(prompt_len, cfg.dim, cfg.n_heads, gate, add_key, device=model.device,
                             input_scale=input_scale, init=init, prompt_kind=prompt, prompt_hidden=prompt_hidden)
        cast(Block, model.layers[i]).self_attn.prefix = prefix
        names += [f"layers.{i}.self_attn.prefix.{n}" for n, _ in prefix.named_parameters()]
    return names


def attach(model: LlamaLM, cfg: AdapterV1Config) -> Attached:
    layers = cfg.adapted_layers(model.config.n_layers)
    names = attach_prompts(model, layers, cfg.prompt_len, cfg.gate, VISUAL_KEY if cfg.vision else None,
                           init=cfg.init, prompt=cfg.prompt, prompt_hidden=cfg.prompt_hidden)
    if not cfg.vision:
        return Attached("adapter_v1", cfg, groups={"adapter": names})
    frontend = VisualFrontend(cfg.vision, cfg.feature_cache).to(model.device)
    # The frontend standardises each channel, so the projector needs no input norm of its own.
    proj = GlobalMLPProjector(frontend.encoder.global_dims, model.config.dim, cfg.visual_hidden,
                              input_norm=False, output_norm=cfg.visual_norm).to(model.device)
    visual, buffers = install_visual(model, frontend, proj)

    def extras(images, batch_size: int) -> dict:
        feats, has = frontend.features(images, batch_size, model.device)
        if feats is None:
            return {}
        return {VISUAL_KEY: proj(feats) * has[:, None].to(proj.fc2.weight.dtype)}

    prepare_inputs, prepare_batch = visual_preparers(extras)
    return Attached("adapter_v1", cfg, groups={"adapter": names, "visual": visual},
                    lr_scale={"visual": cfg.visual_lr_scale}, buffers=buffers, prepare_inputs=prepare_inputs,
                    prepare_batch=prepare_batch)


METHOD = register(Method("adapter_v1", AdapterV1Config, attach))

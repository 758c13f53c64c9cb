"""LLaMA-Adapter (V1): gated adaption prompts in the top L layers (METHODS.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.llama import LlamaLM
from .prefix import GATES, GatedPrefix
from .registry import Attached, Method, register


@dataclass
class AdapterV1Config:
    prompt_len: int = 10
    n_layers: int | None = None  # adapted top layers; None: all but the first two
    gate: str = "per_head_tanh"  # or "per_head", "scalar_tanh", "scalar" (PEFT-compatible)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.n_layers is not None and self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")

    def adapted_layers(self, model_layers: int) -> range:
        n = self.n_layers if self.n_layers is not None else max(model_layers - 2, 1)
        if n > model_layers:
            raise ValueError(f"n_layers={n} adapted layers, but the model has only {model_layers}")
        return range(model_layers - n, model_layers)


def attach_prompts(model: LlamaLM, layers: range, prompt_len: int, gate: str,
                   add_key: str | None = None) -> list[str]:
    """Give each layer in `layers` a gated prefix; return the new parameter names."""
    cfg = model.config
    names = []
    for i in layers:
        model.layers[i].self_attn.prefix = GatedPrefix(prompt_len, cfg.dim, cfg.n_heads, gate, add_key,
                                                       device=model.device)
        names += [f"layers.{i}.self_attn.prefix.prompt", f"layers.{i}.self_attn.prefix.gate"]
    return names


def attach(model: LlamaLM, cfg: AdapterV1Config) -> Attached:
    names = attach_prompts(model, cfg.adapted_layers(model.config.n_layers), cfg.prompt_len, cfg.gate)
    return Attached("adapter_v1", cfg, groups={"adapter": names})


METHOD = register(Method("adapter_v1", AdapterV1Config, attach))

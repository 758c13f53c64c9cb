"""The LLaMA-Adapter V1 release: one flat .pth with `adapter_query.weight` [L*K, C] (the prompts of
the top L layers, lowest first) and `layers.{i}.attention.gate` [1, H, 1, 1] for every layer.

Maps onto AdapterV1 with per-head tanh gates, as the release was trained (its inference script
drops the tanh, a known defect not reproduced). Gates of the layers below the top L have no
prompt to gate, in the release as here, and are not loaded.
"""

from __future__ import annotations

import re

import torch

from ..methods.adapter_v1 import AdapterV1Config
from ..model.llama import LlamaLM
from .imported import Imported, expect_shape, refuse_keys, release_prompts, shape_why

GATE = re.compile(r"layers\.(\d+)\.attention\.gate")


def is_v1_release(state: dict[str, torch.Tensor]) -> bool:
    return "adapter_query.weight" in state and any(GATE.fullmatch(k) for k in state)


def import_v1_release(model: LlamaLM, state: dict[str, torch.Tensor], origin: str,
                      prompt_len: int = 10) -> Imported:
    c, why = model.config, shape_why(model)
    refuse_keys(origin, [k for k in state if k != "adapter_query.weight" and not GATE.fullmatch(k)],
                "not part of the LLaMA-Adapter V1 release format")
    query = state["adapter_query.weight"]
    n_adapted = release_prompts(origin, query, prompt_len, model)
    gates = {int(m.group(1)): v for k, v in state.items() if (m := GATE.fullmatch(k))}
    for i, g in gates.items():
        if i >= c.n_layers:
            raise ValueError(f"{origin}: layers.{i}.attention.gate is for layer {i}, but this base model has "
                             f"{c.n_layers} layers ({why})")
        expect_shape(origin, f"layers.{i}.attention.gate", g, (1, c.n_heads, 1, 1), why)
    first = c.n_layers - n_adapted
    missing = [f"layers.{i}.attention.gate" for i in range(first, c.n_layers) if i not in gates]
    if missing:
        raise ValueError(f"{origin}: the gates of adapted layers are missing: {missing[:4]}")
    prompts = query.reshape(n_adapted, prompt_len, c.dim)
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for j, i in enumerate(range(first, c.n_layers)):
        tensors[f"layers.{i}.self_attn.prefix.prompt"] = prompts[j]
        tensors[f"layers.{i}.self_attn.prefix.gate"] = gates[i].reshape(c.n_heads)
        source[f"layers.{i}.self_attn.prefix.prompt"] = f"adapter_query.weight[{j * prompt_len}:{(j + 1) * prompt_len}]"
        source[f"layers.{i}.self_attn.prefix.gate"] = f"layers.{i}.attention.gate"
    return Imported(AdapterV1Config(prompt_len=prompt_len, n_layers=n_adapted, gate="per_head_tanh"), tensors, source)

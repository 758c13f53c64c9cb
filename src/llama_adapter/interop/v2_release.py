"""The LLaMA-Adapter V2 multimodal release: a .pth with {'model': state dict, 'config': {w_bias, w_lora,
lora_rank}} over Meta-layout LLaMA names (`llama.` prefix).

What maps onto AdapterV2 (text path): the late adaption prompts `adapter_query.weight` and their
tanh gates, the biases of wq/wo/w1/w2/w3 (and wk/wv when present) as our per-channel
`delta_bias` with scale 1, the norms, and the LoRA factors `lora_*_l1/l2` (scaling 1, so our
alpha = rank). Meta's rotary layout of wq/wk is permuted into ours for their biases and the
output side of their LoRA factors. `new_gate` is accepted only at its initial value 1.

The visual parts map, with `vision="clip:<CLIP ViT-L/14 folder>"` (the release reads CLIP from
OpenAI's package, not from the .pth), onto our V2's release-compatibility options:
`visual_projector="release"` (ReleaseQueryProjector: clip_proj, clip_proj_norm, visual_query,
visual_blocks, visual_proj, visual_proj_norm under `visual.proj.`, the same names, on CLIP's
projected tokens incl. [CLS]) and `visual_fusion="all_layers"` (the visual tokens are added to the
prompts of every adapted layer, the release's behaviour, not the paper's early fusion: said in a
warning). Without `vision` they are refused; `skip_visual=True` loads the language-model part
alone (the prompts without visual tokens).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..methods.adapter_v2 import LINEARS, AdapterV2Config
from ..model.llama import LlamaLM
from ..model.meta import meta_to_hf_rows
from .imported import Imported, expect_shape, refuse_keys, release_prompts, shape_why, visual_keys

VISUAL_PREFIXES = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.",
                   "visual_proj_norm.", "clip.")
PROJECTOR_PREFIXES = VISUAL_PREFIXES[:-1]  # ReleaseQueryProjector's names; "clip." (CLIP itself) never maps
BLOCK = re.compile(r"visual_blocks\.(\d+)\.")
RELEASE_HEADS = 16  # the release's visual blocks: 768 wide, 16 heads (not recorded in the file)
LINEAR = {"wq": ("self_attn", "q_proj"), "wk": ("self_attn", "k_proj"), "wv": ("self_attn", "v_proj"),
          "wo": ("self_attn", "o_proj"), "w1": ("mlp", "gate_proj"), "w2": ("mlp", "down_proj"),
          "w3": ("mlp", "up_proj")}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
BIAS = re.compile(r"layers\.(\d+)\.(?:attention|feed_forward)\.(wq|wk|wv|wo|w1|w2|w3)\.bias")
LORA = re.compile(r"layers\.(\d+)\.(?:attention|feed_forward)\.lora_(wq|wk|wv|wo|w1|w2|w3)_l([12])\.weight")
GATE = re.compile(r"layers\.(\d+)\.attention\.gate")
NEW_GATE = re.compile(r"layers\.(\d+)\.attention\.new_gate")
NORM = re.compile(r"layers\.(\d+)\.(attention_norm|ffn_norm)\.weight")


def is_v2_release(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
            and any(str(k).startswith("llama.") for k in obj["model"]))


def _rows_permuted(model: LlamaLM, short: str, t: torch.Tensor) -> torch.Tensor:
    c = model.config
    if short == "wq":
        return meta_to_hf_rows(t, c.n_heads)
    if short == "wk":
        return meta_to_hf_rows(t, c.n_kv_heads)
    return t


def import_v2_release(model: LlamaLM, state: dict[str, torch.Tensor], origin: str, config: dict[str, Any],
                      skip_visual: bool = False, prompt_len: int | None = None, vision: str | None = None,
                      visual_heads: int | None = None) -> Imported:
    c, why = model.config, shape_why(model)
    layer0 = model.layers[0]
    sizes = {short: tuple(getattr(getattr(layer0, part), name).weight.shape) for short, (part, name) in LINEAR.items()}
    visual, notes = visual_keys(
        origin, state, VISUAL_PREFIXES, skip_visual, vision,
        unmapped=lambda k: not k.startswith(PROJECTOR_PREFIXES),
        needs_vision="the V2 release's visual parts need the CLIP ViT-L/14 they were trained on: pass "
                     "vision='clip:<folder>' (convert: --vision) to map them, or skip_visual=True (convert: "
                     "--skip-visual) to load the language-model part alone",
        not_mapped="CLIP's own weights are read from the vision folder, not from the adapter file",
        text_only="the prompts act without the release's visual tokens, i.e. text-only")
    if prompt_len is None:
        prompt_len = state["visual_query.weight"].shape[0] if "visual_query.weight" in state else 10
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    gates: dict[int, torch.Tensor] = {}
    lora: dict[tuple[int, str, str], torch.Tensor] = {}
    unknown, new_gates = [], []
    for key, t in state.items():
        if key in visual and not skip_visual:
            tensors[f"visual.proj.{key}"], source[f"visual.proj.{key}"] = t, key
        if key in visual or key == "adapter_query.weight":
            continue
        name = key.removeprefix("llama.")
        if m := GATE.fullmatch(name):
            gates[int(m.group(1))] = t
        elif NEW_GATE.fullmatch(name):
            if not torch.equal(t, torch.ones_like(t)):
                new_gates.append(key)
        elif m := BIAS.fullmatch(name):
            i, short = int(m.group(1)), m.group(2)
            expect_shape(origin, key, t, (sizes[short][0],), why)
            part, lin = LINEAR[short]
            ours = f"layers.{i}.{part}.{lin}.delta_bias"
            tensors[ours], source[ours] = _rows_permuted(model, short, t), key
        elif m := LORA.fullmatch(name):
            lora[(int(m.group(1)), m.group(2), m.group(3))] = t
            source[f"lora:{m.group(1)}:{m.group(2)}:{m.group(3)}"] = key
        elif m := NORM.fullmatch(name):
            ours = f"layers.{m.group(1)}.{NORMS[m.group(2)]}.weight"
            tensors[ours], source[ours] = t, key
        elif name == "norm.weight":
            tensors["norm.weight"], source["norm.weight"] = t, key
        else:
            unknown.append(key)
    refuse_keys(origin, unknown, "not part of the LLaMA-Adapter V2 release format as mapped here")
    refuse_keys(origin, new_gates, "new_gate differs from its initial value 1, and our modules have no such "
                "second gate")
    for i in gates:
        if i >= c.n_layers:
            raise ValueError(f"{origin}: llama.layers.{i}.attention.gate is for layer {i}, but this base model has "
                             f"{c.n_layers} layers ({why})")
    n_adapted = 0
    if "adapter_query.weight" in state:
        query = state["adapter_query.weight"]
        n_adapted = release_prompts(origin, query, prompt_len, model)
        for j, i in enumerate(range(c.n_layers - n_adapted, c.n_layers)):
            key = f"llama.layers.{i}.attention.gate"
            if i not in gates:
                raise ValueError(f"{origin}: {key} (the gate of an adapted layer) is missing")
            expect_shape(origin, key, gates[i], (1, c.n_heads, 1, 1), why)
            p, g = f"layers.{i}.self_attn.prefix.prompt", f"layers.{i}.self_attn.prefix.gate"
            tensors[p] = query[j * prompt_len:(j + 1) * prompt_len]
            tensors[g] = gates[i].reshape(c.n_heads)
            source[p], source[g] = f"adapter_query.weight[{j * prompt_len}:{(j + 1) * prompt_len}]", key
    rank = int(config.get("lora_rank") or min(t.shape[-1] for t in lora.values())) if lora else 0
    targets = sorted({short for _, short, _ in lora}, key=list(LINEAR).index)
    for (i, short, side), t in lora.items():
        key = source.pop(f"lora:{i}:{short}:{side}")
        out_f, in_f = sizes[short]
        expect_shape(origin, key, t, (rank, in_f) if side == "1" else (out_f, rank), f"{why}, lora_rank={rank}")
        part, lin = LINEAR[short]
        ours = f"layers.{i}.{part}.{lin}.lora.{'A' if side == '1' else 'B'}"
        tensors[ours], source[ours] = (t if side == "1" else _rows_permuted(model, short, t)), key
    has_bias = any(n.endswith(".delta_bias") for n in tensors)
    has_norms = any(n.endswith("norm.weight") for n in tensors)
    cfg = AdapterV2Config(prompt_len=prompt_len, n_layers=n_adapted, gate="per_head_tanh", bias_scale=has_bias,
                          norms=has_norms, lora_rank=rank, lora_alpha=float(rank),
                          lora_targets=tuple(LINEAR[s][1] for s in targets) if rank else LINEARS)
    if visual and not skip_visual:
        cfg = _with_release_visual(cfg, state, origin, str(vision), visual_heads)
        notes.append(f"the release adds its {cfg.visual_queries} visual tokens to the adaption prompts of every "
                     f"adapted layer: loaded with visual_fusion='all_layers' and visual_projector='release' "
                     f"(its behaviour), not the paper's early fusion (visual prompts of their own in the first layers)")
    return Imported(cfg, tensors, source, notes)


def _with_release_visual(cfg: AdapterV2Config, state: dict[str, torch.Tensor], origin: str, vision: str,
                         heads: int | None) -> AdapterV2Config:
    """The config of the release's visual side: its query count, width and block count, read from the file."""
    query = state.get("visual_query.weight")
    if query is None or query.dim() != 2:
        raise ValueError(f"{origin}: visual_query.weight is missing or not [n_queries, width]: cannot size the "
                         f"release's visual projector")
    if query.shape[0] != cfg.prompt_len:
        raise ValueError(f"{origin}: visual_query.weight has {query.shape[0]} rows but the prompts have "
                         f"{cfg.prompt_len}: the release adds one visual token to each prompt row")
    blocks = {int(m.group(1)) for k in state if (m := BLOCK.match(k))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"{origin}: visual_blocks are numbered {sorted(blocks)}, not 0..{len(blocks) - 1}")
    return dataclasses.replace(cfg, vision=vision, visual_fusion="all_layers", visual_projector="release",
                               visual_queries=int(query.shape[0]), visual_blocks=len(blocks),
                               visual_width=int(query.shape[1]), visual_heads=heads or RELEASE_HEADS)

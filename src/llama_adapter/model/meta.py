"""Meta's original LLaMA folders: params.json, consolidated.NN.pth shards, tokenizer.model.

The shards are the model-parallel slices of Meta's reference code: column-parallel weights
(wq, wk, wv, w1, w3, output) are split by output rows, row-parallel ones (wo, w2) by input
columns, norms are replicated, and the token embedding is split by width (LLaMA 1/2) or by
vocabulary (Llama 3), which the slices' shapes tell apart. Meta's wq/wk rotate interleaved
pairs (x[2i], x[2i+1]); our rotary, like Hugging Face's, rotates halves (x[i], x[i + d/2]),
so their rows are permuted per head (`meta_to_hf_rows`); q.k products are unchanged by it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, RopeScaling

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
REPLICATED = ("attention_norm", "ffn_norm", "norm")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def is_meta_folder(path: Path) -> bool:
    """A folder in Meta's layout (and not also a Hugging Face folder, which wins)."""
    return (path.is_dir() and (path / "params.json").is_file() and not (path / "config.json").is_file()
            and any(path.glob("consolidated.*.pth")))


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or its bias, or a low-rank factor on its output side) from Meta's
    interleaved rotary layout to the half-split one: per head, new[i] = old[2i], new[d/2 + i] = old[2i + 1]."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _split_kind(name: str) -> str:
    stem = name.removesuffix(".weight")
    stem = re.sub(r"^layers\.\d+\.", "", stem)
    if stem in COLUMN_PARALLEL:
        return "rows"
    if stem in ROW_PARALLEL:
        return "cols"
    if stem in REPLICATED:
        return "same"
    if stem == "tok_embeddings":
        return "embedding"
    raise ValueError(f"unexpected tensor {name!r} in a Meta checkpoint")


def merge_shards(shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """One state dict from Meta's model-parallel slices (`dim`: the model width, to place the embedding)."""
    names = [k for k in shards[0] if k != "rope.freqs"]
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) - {"rope.freqs"} != set(names):
            raise ValueError(f"shard {i} holds other tensors than shard 0: the shards are not of one checkpoint")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [s[name] for s in shards]
        kind = _split_kind(name)
        if kind == "embedding":
            kind = "rows" if all(p.shape[1] == dim for p in parts) else "cols"
        if len(parts) == 1 or kind == "same":
            merged[name] = parts[0]
        else:
            merged[name] = torch.cat(parts, dim=0 if kind == "rows" else 1)
    return merged


def meta_config(params: dict[str, Any], state: dict[str, torch.Tensor]) -> ModelConfig:
    """Our config from params.json; vocabulary and feed-forward widths are read off the weights
    (LLaMA 1/2's params.json says vocab_size -1 and derives the FFN width from multiple_of)."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as e:
        raise ValueError(f"params.json lacks {e.args[0]!r} (needs dim, n_layers, n_heads)") from None
    theta = float(params.get("rope_theta", 10000.0))
    scaling = RopeScaling()
    if params.get("use_scaled_rope"):
        scaling = RopeScaling("llama3", factor=float(params.get("rope_scaling_factor", 8.0)),
                              original_max_position_embeddings=8192)
    default_len = 131072 if params.get("use_scaled_rope") else 8192 if theta >= 500000 else 4096
    return ModelConfig(
        vocab_size=state["output.weight"].shape[0], dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads), ffn_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
        norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(params.get("max_seq_len", default_len)), model_type="llama",
    )


def meta_to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Meta names and rotary layout -> our (Hugging Face) names and layout."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            if name not in _TOP_NAMES:
                raise ValueError(f"unexpected tensor {name!r} in a Meta checkpoint")
            out[_TOP_NAMES[name]] = t
            continue
        i, rest = m.groups()
        if rest not in _LAYER_NAMES:
            raise ValueError(f"unexpected tensor {name!r} in a Meta checkpoint")
        if rest == "attention.wq.weight":
            t = meta_to_hf_rows(t, cfg.n_heads)
        elif rest == "attention.wk.weight":
            t = meta_to_hf_rows(t, cfg.n_kv_heads)
        out[f"layers.{i}.{_LAYER_NAMES[rest]}"] = t
    return out


def shard_paths(folder: Path) -> list[Path]:
    paths = sorted(folder.glob("consolidated.*.pth"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not paths:
        raise FileNotFoundError(f"no consolidated.*.pth shards in {folder}")
    return paths


def read_meta_weights(folder: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names and layout) of a Meta folder; shards are memory-mapped."""
    from tqdm import tqdm

    try:
        params = json.loads((folder / "params.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'params.json'} is not valid JSON: {e}") from e
    shards = []
    for path in tqdm(shard_paths(folder), desc="reading Meta shards", unit="shard", disable=not progress):
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # weights_only refuses code; a truncated zip fails here too
            raise ValueError(f"{path} is not a readable weights-only .pth shard: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    merged = merge_shards(shards, int(params.get("dim", 0)))
    cfg = meta_config(params, merged)
    return cfg, meta_to_hf_state(merged, cfg)


def meta_tokenizer(folder: Path) -> Any:
    """A Hugging Face fast tokenizer converted from Meta's sentencepiece tokenizer.model."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.model in {folder}: Meta folders carry their sentencepiece tokenizer")
    head = path.read_bytes()[:64]
    if re.match(rb"^[A-Za-z0-9+/=]+ \d+\n", head):
        raise ValueError(f"{path} is a tiktoken (Llama 3) vocabulary, which is not supported; load the Hugging "
                         f"Face release of that model instead")
    try:
        import sentencepiece  # noqa: F401  (transformers' converter reads the model through it)
    except ImportError:
        raise ImportError("reading Meta's tokenizer.model needs sentencepiece: pip install sentencepiece") from None
    from transformers import LlamaTokenizer

    # LLaMA prepends BOS and never appends EOS to a prompt
    return LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False)

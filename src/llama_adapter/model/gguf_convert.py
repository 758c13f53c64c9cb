"""Convert a GGUF file of a LLaMA-family model into a Hugging Face style folder.

llama.cpp stores the query/key weights of `llama`-architecture models permuted for its
interleaved rotary layout; we undo that permutation (qwen2 files are not permuted).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, RopeScaling

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any, path: Path) -> ModelConfig:
    """The ModelConfig from a GGUF file's metadata (llama and qwen2 architectures)."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (llama, qwen2)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: GGUF rope_freqs (Llama 3.1 scaling) is not supported; load the HF folder")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    dim = _field(reader, f"{arch}.embedding_length")
    scaling = RopeScaling()
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = RopeScaling(rope_type="linear", factor=_field(reader, f"{arch}.rope.scaling.factor"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        dim=dim,
        n_layers=_field(reader, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", n_heads),
        ffn_dim=_field(reader, f"{arch}.feed_forward_length"),
        head_dim=_field(reader, f"{arch}.rope.dimension_count", dim // n_heads),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=_field(reader, f"{arch}.context_length", 2048),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        model_type=arch,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation (interleaved rotary pairs -> rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize every tensor of a GGUF file into fp32, renamed to our layout."""
    import gguf
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on corrupt files
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    cfg = gguf_config(reader, path)
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", disable=not progress, unit="tensor"):
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m:
            key = _LAYER_NAMES.get(m.group(2))
            name = None if key is None else f"layers.{m.group(1)}.{key}"
        else:
            name = _TOP_NAMES.get(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if cfg.model_type == "llama" and m and m.group(2) in ("attn_q.weight", "attn_q.bias"):
            w = unpermute(w, cfg.n_heads)
        elif cfg.model_type == "llama" and m and m.group(2) in ("attn_k.weight", "attn_k.bias"):
            w = unpermute(w, cfg.n_kv_heads)
        state[name] = torch.from_numpy(w.copy())
    return cfg, state


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer and chat template stored in the GGUF file, through transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

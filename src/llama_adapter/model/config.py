"""The shape of a LLaMA-family model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm3")
# SmolLM3's layout is the one transformers architecture with SwiGLU, RMSNorm, rotary embeddings, biases on
# every linear and a sliding window: export writes it for a windowed model that gained biases (rotary in
# every layer; NoPE layers, which real SmolLM3 checkpoints have, are refused on reading)


@dataclass
class RopeScaling:
    """Rotary scaling: "default" (none), "linear", or "llama3" (Llama 3.1+ frequency bands)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r} (default, linear, llama3)")


@dataclass
class ModelConfig:
    """A LLaMA-family architecture (sizes, rotary, biases, window), read from and written to HF config.json."""
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.eos_token_ids = tuple(self.eos_token_ids)
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Translate a transformers config dict (v4 or v5 layout) into ours."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu / SwiGLU)")
        rope: dict[str, Any] = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            **{k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings") if k in rope},
        )
        window = hf.get("sliding_window")
        if model_type == "qwen2":
            if hf.get("use_sliding_window"):
                raise ValueError("qwen2 with use_sliding_window=true is not supported")
            window = None
        if model_type == "smollm3":
            window = _smollm3_window(hf)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or 0,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            o_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict describing this model (for export)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope.update({k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k != "rope_type"})
        out = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias or self.o_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "smollm3":
            out.update(attention_bias=self.qkv_bias or self.o_bias, mlp_bias=self.mlp_bias, pad_token_id=None,
                       use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                       no_rope_layers=[1] * self.n_layers,
                       layer_types=["sliding_attention" if self.sliding_window else "full_attention"] * self.n_layers)
        return out


def _smollm3_window(hf: dict[str, Any]) -> int | None:
    """The one sliding window of a SmolLM3 config that this model supports: rotary in every layer, and the
    same attention (windowed or full) in every layer."""
    n = hf["num_hidden_layers"]
    if any(not x for x in hf.get("no_rope_layers") or [0]):
        raise ValueError("smollm3 with layers without rotary embeddings (no_rope_layers) is not supported")
    if not (hf.get("use_sliding_window") and hf.get("sliding_window")):
        return None
    kinds = set(hf.get("layer_types") or ["sliding_attention"] * n)
    if kinds != {"sliding_attention"}:
        raise ValueError(f"smollm3 with mixed attention layer types {sorted(kinds)} is not supported")
    return int(hf["sliding_window"])


def read_hf_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder} (looked for {path})")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e

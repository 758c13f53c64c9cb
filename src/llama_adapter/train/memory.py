"""Estimated memory per device of a training run, before buying or renting the devices.

An estimate from shapes, not a measurement (bench/gpu_check.py measures on a GPU): frozen weights
in their storage dtype (sharded across the devices for the decoder blocks under `shard: fsdp`,
plus the two blocks FSDP2 holds gathered at a time), trainable weights, their gradients and AdamW's
two moments in fp32, and the activations the backward pass keeps at the recipe's batch and length.
Activations count, per token and decoder layer, the tensors autograd saves in our block when the
base is frozen (the fp32 input of each RMSNorm and its output, the rotated queries/keys/values and
the attention output for the fused SDPA backward, SwiGLU's gate, up and activation), plus the
outputs of the seven linears when a method trains something inside them (V2's scales and biases,
LoRA), and the fp32 logits and their gradient at every position; only in the layers from the lowest one that
trains up (gradients never flow below it: V1's top-L layers). With activation checkpointing a
layer keeps only its input, and one layer at a time is recomputed. Not included: the CUDA context
and allocator slack (count 1-2 GB), the vision encoder's activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..model.config import ModelConfig
from .config import TrainConfig

GIB = 1024**3
LINEARS_IN_BLOCK = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")


@dataclass
class ParameterSplit:
    """Parameter counts of an attached model by where they live and whether they train."""

    frozen_in_blocks: int  # what `shard: fsdp` shards
    frozen_outside: int  # embeddings, head, final norm, vision encoder: replicated
    trainable: int
    largest_block: int  # frozen parameters of the largest decoder block (FSDP gathers one at a time)
    trains_inside_linears: bool  # scales, biases or LoRA in the block's linears: their outputs are kept
    layers_with_grad: int  # from the lowest block that trains up: gradients never reach the layers below it


def split_parameters(model: nn.Module, trainable_names: set[str]) -> ParameterSplit:
    frozen_in, frozen_out, trainable = 0, 0, 0
    per_block: dict[str, int] = {}
    trained_blocks = [int(n.split(".")[1]) for n in trainable_names if n.startswith("layers.")]
    block_ids = [int(n.split(".")[1]) for n, _ in model.named_parameters() if n.startswith("layers.")]
    n_blocks = 1 + max(block_ids, default=-1)
    # a trained tensor that enters at the input (LaVIN's modality tokens, a visual prefix) is in every layer's graph
    feeds_input = any(not n.startswith("layers.") and not n.startswith(("norm.", "lm_head.")) for n in trainable_names)
    layers_with_grad = n_blocks if feeds_input else n_blocks - min(trained_blocks, default=n_blocks)
    for name, p in model.named_parameters():
        if name in trainable_names:
            trainable += p.numel()
        elif name.startswith("layers."):
            frozen_in += p.numel()
            block = name.split(".")[1]
            per_block[block] = per_block.get(block, 0) + p.numel()
        else:
            frozen_out += p.numel()
    inside = any(name.startswith("layers.") and any(k in name for k in LINEARS_IN_BLOCK) for name in trainable_names)
    return ParameterSplit(frozen_in, frozen_out, trainable, max(per_block.values(), default=0), inside,
                          layers_with_grad)


@dataclass
class MemoryEstimate:
    """GiB per device."""

    frozen_weights: float
    trainable_weights: float
    gradients: float
    optimizer_state: float
    activations: float
    total: float


def activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, inside_linears: bool) -> int:
    """Bytes one token keeps for the backward pass in one decoder layer (see the module docstring)."""
    d, f = cfg.dim, cfg.ffn_dim
    kv = cfg.n_kv_heads * (cfg.head_dim or d // cfg.n_heads)
    norms = 2 * (4 * d + act_bytes * d)  # fp32 input and the normed output, twice per block
    attention = act_bytes * (2 * d + 2 * kv)  # q, k, v rotated, the attention output
    mlp = act_bytes * 3 * f  # gate, up, silu(gate)
    linears = act_bytes * (2 * d + 2 * kv + 2 * f + d) if inside_linears else 0
    return norms + attention + mlp + linears


def estimate_memory(cfg: ModelConfig, split: ParameterSplit, train: TrainConfig, seq_len: int, devices: int = 1,
                    shard: str = "none") -> MemoryEstimate:
    if shard not in ("none", "fsdp"):
        raise ValueError(f"shard must be none or fsdp, got {shard!r}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    base_bytes = 2 if train.base_dtype == "bf16" else 4
    act_bytes = 4 if train.precision == "fp32" else 2
    if shard == "fsdp" and devices > 1:
        blocks = split.frozen_in_blocks / devices + 2 * split.largest_block  # own shard + gathered ones
    else:
        blocks = split.frozen_in_blocks
    frozen = (blocks + split.frozen_outside) * base_bytes
    trainable = split.trainable * 4
    tokens = train.batch_size * seq_len  # per micro-batch: gradient accumulation does not add to it
    per_layer = activation_bytes_per_token(cfg, act_bytes, split.trains_inside_linears)
    n = split.layers_with_grad
    if train.activation_checkpointing:
        layers = tokens * (n * act_bytes * cfg.dim + per_layer) if n else 0
    else:
        layers = tokens * n * per_layer
    logits = tokens * cfg.vocab_size * (act_bytes + 4 + 4)  # logits, their fp32 copy and its gradient
    activations = layers + logits
    return MemoryEstimate(frozen_weights=frozen / GIB, trainable_weights=trainable / GIB, gradients=trainable / GIB,
                          optimizer_state=2 * trainable / GIB, activations=activations / GIB,
                          total=(frozen + 4 * trainable + activations) / GIB)


def memory_table(cfg: ModelConfig, split: ParameterSplit, train: TrainConfig, seq_len: int,
                 devices: int) -> dict[str, dict[str, float]]:
    """{"none": ..., "fsdp x N": ...} estimates, rounded to 0.001 GiB, for printing."""
    out = {}
    for shard in ("none", "fsdp"):
        est = estimate_memory(cfg, split, train, seq_len, devices, shard)
        key = "shard none" if shard == "none" else f"shard fsdp x {devices} devices"
        out[key] = {k: round(v, 3) for k, v in asdict(est).items()}
    return out

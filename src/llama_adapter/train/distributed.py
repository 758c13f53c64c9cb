"""torchrun support: process group from the environment, gradient sync that cannot diverge, FSDP2
sharding of the frozen base, rank-0 I/O.

Why a hand-written all-reduce for the trainable parameters rather than DDP: DDP registers its
gradient hooks once, for the parameters that require grad when it is built, and our parameter
groups toggle per step (V2 trains disjoint groups on caption and instruction steps); DDP with
`find_unused_parameters` would also hand a zero gradient to every parameter of an idle group,
which AdamW then moves (weight decay, momentum). The trainable set is a few million parameters,
so one bucketed all-reduce per optimizer step costs nothing next to the forward pass, and it is
written so that every rank reduces the same tensors in the same order whatever its micro-batch
held (see `sum_gradients`). The frozen base, which is what does not fit on a device, is sharded
with PyTorch's own FSDP2 (`shard_frozen_base`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 16 * 1024 * 1024  # per all-reduce: 64 MB of fp32


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_process_group() -> None:
    """Leave the process group (torchrun) before the interpreter exits: a gloo group still alive at exit
    aborted a rank now and then ("terminate called without an active exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() + 1 > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel() + 1
    return out


def sum_gradients(params: list[torch.nn.Parameter], d: Dist, bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum gradients over processes (each process already divided its loss by the global count).

    Every rank passes the same parameters (the step's whole active group, in the trainer's order)
    and reduces buffers of the same layout: a missing gradient (a micro-batch without images
    leaves the visual parameters untouched) counts as zeros, plus one flag per parameter that
    counts the ranks that had a gradient. A parameter no rank touched keeps `grad = None`, as in
    one process, so the optimizer skips it rather than decaying it.
    """
    if d.world == 1 or not params:
        return
    for bucket in _buckets(params, bucket_elements):
        ref = bucket[0]
        flat = torch.zeros(sum(p.numel() for p in bucket) + len(bucket), dtype=torch.float32, device=ref.device)
        offset = 0
        for i, p in enumerate(bucket):
            if p.grad is not None:
                flat[offset: offset + p.numel()] = p.grad.reshape(-1)
                flat[-len(bucket) + i] = 1.0
            offset += p.numel()
        dist.all_reduce(flat)
        touched = flat[-len(bucket):].tolist()  # one device sync per bucket, not one per parameter
        offset = 0
        for i, p in enumerate(bucket):
            if touched[i] > 0:
                g = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += p.numel()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shard_frozen_base(blocks: Iterable[nn.Module], root: nn.Module, keep: set[nn.Parameter], d: Dist) -> None:
    """FSDP2: shard the frozen weights of each decoder block (all-gathered per block in forward and
    backward) across the ranks; every parameter in `keep` (the trainable ones, and what runs outside
    the blocks: embeddings, head, vision encoder) stays a plain replicated tensor, so the
    trainable gradients go through `sum_gradients` and the adapter saves as it does in one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if d.world == 1:
        return
    device = next(root.parameters()).device
    mesh = init_device_mesh(device.type, (d.world,))
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep & set(block.parameters()))
    fully_shard(root, mesh=mesh, ignored_params=set(keep))


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())

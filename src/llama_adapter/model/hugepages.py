"""A CPU model's frozen weights in memory the kernel may back with 2 MiB pages.

Decoding one token reads every weight once; on a CPU the weights of a model larger than the caches are read from
memory, and with 4 KiB pages a quarter-gigabyte model spans some 65,000 pages per token, each a translation the
processor must look up. Linux backs an anonymous mapping with 2 MiB pages where asked to (`madvise`; the common
"madvise" mode of transparent huge pages does so only when asked), and PyTorch's allocator does not ask for tensors
as small as a layer's weights. So the loader puts the frozen weights into one such mapping (`HugePageArena`),
joint q/k/v and gate/up weights included (model/fused.py): batch-1 decoding of SmolLM2-135M ran faster with it
(docs/benchmarks.md, bench/huge_pages.py). Values, tensors' identities and their sharing are unchanged.
"""

from __future__ import annotations

import math
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

from ..device import switched_on
from .fused import fuse_projections

ENV_SWITCH = "LLAMA_ADAPTER_HUGE_PAGES"  # "0" / "off" / "false": leave the weights where the loader put them
HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether the kernel can back a mapping with huge pages on request (Linux with transparent huge pages in
    "always" or "madvise" mode) and the switch leaves it on."""
    if not switched_on(ENV_SWITCH):
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def mapping_fields(address: int) -> dict[str, str]:
    """What the kernel reports (/proc/self/smaps) for the memory mapping holding `address`: e.g. "VmFlags" ("hg":
    advised for huge pages) and "AnonHugePages" (how much of it they back); empty where there is no such file."""
    fields: dict[str, str] = {}
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    if inside:
                        break
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
    except OSError:
        pass
    return fields


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class HugePageArena:
    """One anonymous mapping advised for huge pages, handed out front to back; each tensor made here has a
    storage of its own (so saving and pickling see separate tensors), and the mapping lives while any does."""

    def __init__(self, nbytes: int):
        self._region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._region.madvise(mmap.MADV_HUGEPAGE)
        self._start = torch.frombuffer(self._region, dtype=torch.uint8, count=1).data_ptr()
        self._next = -self._start % HUGE_PAGE  # huge pages cover 2 MiB-aligned ranges only
        self._end = len(self._region)

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and self._start <= tensor.data_ptr() < self._start + self._end

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the mapping; one from the allocator when the mapping is full."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if numel == 0 or self._next + nbytes > self._end:
            return torch.empty(tuple(shape), dtype=dtype)
        t = torch.frombuffer(self._region, dtype=dtype, count=numel, offset=self._next).view(tuple(shape))
        self._next += _aligned(nbytes)
        return t


def frozen_cpu_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's frozen, non-empty CPU parameters and buffers that own their storage whole (views of a larger
    one, such as a joint weight's rows, stay with it), each once (a tied table is one tensor)."""
    found: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if (t.device.type == "cpu" and not t.requires_grad and t.numel() > 0 and t.is_contiguous()
                and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
            found.setdefault(id(t), t)
    return list(found.values())


def frozen_bytes(module: nn.Module) -> int:
    """An arena size that holds every frozen CPU parameter and buffer of `module`, joined or not."""
    return sum(_aligned(t.numel() * t.element_size()) for t in frozen_cpu_tensors(module))


def move_to_huge_pages(module: nn.Module, arena: HugePageArena | None = None) -> HugePageArena:
    """Copy the module's frozen CPU tensors (`frozen_cpu_tensors`) not yet in `arena` into it, in place: each
    tensor object keeps its identity, its data moves and its old memory is freed unless held elsewhere."""
    arena = arena or HugePageArena(frozen_bytes(module))
    for t in frozen_cpu_tensors(module):
        if not arena.holds(t):
            moved = arena.empty(t.shape, t.dtype)
            moved.copy_(t)
            t.data = moved
    return arena


def move_model_to_huge_pages(model: nn.Module) -> HugePageArena:
    """The loader's step: the joint q/k/v and gate/up weights made in the arena (model/fused.py, which decoding
    would otherwise make with the allocator at the first call), then every other frozen tensor moved there."""
    arena = HugePageArena(frozen_bytes(model))
    fuse_projections(model, empty=arena.empty)
    return move_to_huge_pages(model, arena)

"""Compile the decode step's graphs in another process, so that the caller's eager decoding goes on at full speed.

Why a process and not a thread: compiling is minutes of Python work that holds the interpreter lock, and an
eager decode step releases and re-takes that lock around each of its ~500 operators, so a compiling thread slows
the decoding thread many times over; a thread still compiling at exit also aborts the process. The worker gets a
description of the step's inputs (shapes, strides, dtypes, which tensors share storage, which are inference
tensors, parameters or require gradients, which sizes are dynamic: everything the graphs and their cache keys
depend on, never the values), builds uninitialised tensors to match, and runs the compiled functions once.
That fills inductor's on-disk cache, from which the caller then compiles the same graphs in a second or two
(model/fastpath.py), and a marker file there that tells later processes they can do so at once.

Started by model/fastpath.py as `python -c "from llama_adapter.model.compile_worker import main; main()"` with
the job (`spec`) on its standard input.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    storage: int  # index into the storages: tensors with the same index share memory
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    inference: bool
    requires_grad: bool
    parameter: bool  # an nn.Parameter: the compiler treats those as static inputs, part of the cache key
    dynamic: tuple[int, ...] = ()  # dimensions marked dynamic (torch._dynamo.mark_dynamic): symbolic in the graph
    maybe_dynamic: tuple[int, ...] = ()  # ... with maybe_mark_dynamic: symbolic unless the graph specialises them


def marked_dims(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dimensions of `t` marked with mark_dynamic and with maybe_mark_dynamic (where dynamo keeps the marks)."""
    return (tuple(sorted(getattr(t, "_dynamo_dynamic_indices", ()))),
            tuple(sorted(getattr(t, "_dynamo_weak_dynamic_indices", ()))))


def dynamic_dims(t: torch.Tensor) -> set[int]:
    """The dimensions of `t` marked dynamic, either way."""
    dynamic, maybe = marked_dims(t)
    return set(dynamic) | set(maybe)


def describe(value: Any, storages: dict[int, tuple[int, int]]) -> Any:
    """`value` (nested tuples, lists, dicts of tensors and plain values) with every tensor replaced by its
    TensorSpec; `storages` collects each distinct storage's index and size in bytes."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError("the compile worker builds CPU tensors only")
        storage = value.untyped_storage()
        key = storage.data_ptr()
        index = storages.setdefault(key, (len(storages), storage.nbytes()))[0]
        return TensorSpec(index, int(value.storage_offset()), tuple(value.shape), tuple(value.stride()), value.dtype,
                          value.is_inference(), value.requires_grad, isinstance(value, nn.Parameter),
                          *marked_dims(value))
    if isinstance(value, dict):
        return {k: describe(v, storages) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(describe(v, storages) for v in value)
    return value


def build(value: Any, storages: list[torch.UntypedStorage]) -> Any:
    """Tensors for the specs of `describe`: uninitialised, laid out and aliased as the originals were."""
    if isinstance(value, TensorSpec):
        with torch.inference_mode(value.inference):
            t = torch.empty(0, dtype=value.dtype).set_(storages[value.storage], value.offset, value.shape,
                                                       value.stride)
            if not (t.is_floating_point() or t.is_complex()):
                t.zero_()  # indices (the step's write position) must be valid; floats may be anything
        if value.parameter:
            t = nn.Parameter(t, requires_grad=value.requires_grad)
        elif value.requires_grad:
            t.requires_grad_(True)
        for dim in value.dynamic:
            torch._dynamo.mark_dynamic(t, dim)
        for dim in value.maybe_dynamic:
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return t
    if isinstance(value, dict):
        return {k: build(v, storages) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(build(v, storages) for v in value)
    return value


def spec(calls: dict[str, tuple], threads: int, done: Path) -> bytes:
    """The pickled job: for each compiled function of model/fastpath.py by name, the arguments of one call; and
    the marker file to create when they are compiled."""
    storages: dict[int, tuple[int, int]] = {}
    described = {name: describe(args, storages) for name, args in calls.items()}
    sizes = [size for _, size in sorted(storages.values())]
    return pickle.dumps({"calls": described, "storage_sizes": sizes, "threads": threads, "done": str(done)})


def marker(key: str) -> Path:
    """Where a worker notes that it compiled the graphs for `key` (the inputs' shapes and the step's settings):
    inside inductor's cache folder, so that clearing the cache clears the notes; keyed by the torch version and
    this package's decode code too, which the cache entries depend on."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    digest = hashlib.sha256(b"\0".join([key.encode(), torch.__version__.encode(), _code_digest()])).hexdigest()
    return Path(cache_dir()) / "llama_adapter_decode" / digest[:32]


@functools.cache
def _code_digest() -> bytes:
    from . import fastpath

    return hashlib.sha256(Path(fastpath.__file__).read_bytes()).digest()


def main() -> int:
    job = pickle.load(sys.stdin.buffer)
    os.nice(19)  # the caller's decoding comes first
    torch.set_num_threads(job["threads"])  # as the caller's: the generated code may depend on it
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # no pool of compiler processes beside the caller's decoding
    from . import fastpath

    storages = [torch.UntypedStorage(size) for size in job["storage_sizes"]]
    with torch.inference_mode():
        for name, args in job["calls"].items():
            compiled = torch.compile(getattr(fastpath, name), dynamic=False, fullgraph=True,
                                     options=fastpath.COMPILE_OPTIONS)
            compiled(*build(args, storages))
    done = Path(job["done"])
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return 0

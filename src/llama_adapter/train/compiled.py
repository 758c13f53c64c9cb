"""`train.compile`: the training step's decoder blocks through `torch.compile` (forward and backward).

What is compiled: each decoder block's forward, one function shared by every block (regional
compilation). Dynamo takes a block's weights as inputs of the graph, so all blocks of one layout
(SmolLM2 with V1 in the top 28 layers: a block with a prompt and one without) run the same graphs,
and AOTAutograd compiles the matching backward graph; inductor fuses the elementwise work between
the matmuls (norms, rotary, gates, SiLU, residuals, their casts under bf16 autocast) in both. On a CPU
the causal attention's backward is written out for it to fuse too (model/attention.py), in place of the
flash kernel's backward.
Compiling a few block graphs takes a fraction of what one graph of the whole model would, and
nothing outside the blocks is traced: the embedding, the rotary table (a cache that grows), the
selection of labelled positions (a data-dependent shape) and the output head stay eager, as does the
optimizer step; the loss's cross-entropy is compiled on its own (dynamic in the number of labels).
Dropout (LaVIN's adapters) draws its masks from the eager random generator (inductor's
`fallback_random`), so a compiled step computes what the eager one does, up to the rounding of fused
arithmetic: equal losses in fp32, within about 1e-3 under bf16 autocast.

The model is not wrapped: while a training forward runs, each block's `forward` is shadowed by an
instance attribute that calls the compiled function, and the attribute is removed afterwards, so
parameter and state-dict names, checkpoints, evaluation (eager, under no_grad) and generation are
untouched. Which parameters train stays the trainer's business (the frozen base gets no gradient).

Graphs are made on first use: the first step waits for them (tens of seconds on a CPU; inductor's
on-disk cache makes later processes faster), and a batch of a new length compiles once more with
that dimension dynamic (dynamo's automatic dynamic shapes). Any failure to compile makes the
trainer warn once and redo that step eagerly, then stay eager.

`train.compile: auto` (the default) keeps the first steps eager, so that no run waits for graphs at
its start, and compiles from the next step once `AUTO_EAGER_STEPS` steps show that the rest of the run
saves more than a cold compile costs (`compile_pays_off`): a short run (the demo's 160 steps of 0.3 s)
stays eager, one with more than about 7 minutes of eager steps left pays ~30 s (twice, with varying
lengths) for steps ~1.3x faster. Only on a CPU in one process, where the
speed-up was measured (docs/benchmarks.md "Training step"); elsewhere `auto` trains eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..loss import cross_entropy_by, summed_cross_entropy
from ..model.llama import Block, LlamaLM

# graphs per compiled function in one process: block layouts x gradient needs x static/dynamic lengths x
# data kinds, and every model a process trains (dynamo's default limit is 8, after which it runs eagerly)
RECOMPILE_LIMIT = 256
# train.compile: auto. The compiled step measured 1.32-1.40x the eager one on 2-core CPUs and its first step
# waited ~31 s on an empty inductor cache (bench/results/train_compile.md); a run whose batches vary in length
# compiles once more (dynamic lengths). The decision assumes less speed-up and a longer wait than that, so that
# a run it compiles is faster overall.
AUTO_SPEEDUP = 1.25
AUTO_COMPILE_SECONDS = 90.0
AUTO_EAGER_STEPS = 4  # eager steps timed before deciding; the first (allocations, cold caches) is not counted


def compile_pays_off(step_seconds: float, steps_left: int, speedup: float = AUTO_SPEEDUP,
                     compile_seconds: float = AUTO_COMPILE_SECONDS) -> bool:
    """Whether compiling now shortens the run: what the remaining steps would save against the compile's wait."""
    return steps_left * step_seconds * (1 - 1 / speedup) > compile_seconds


def _block_forward(block: Block, *args: Any) -> torch.Tensor:
    """The eager block forward (activation checkpointing included), as the function that gets compiled."""
    return Block.forward(block, *args)


class CompiledBlocks:
    """The compiled block forward of one model, installed only around training forwards (`active`)."""

    def __init__(self, model: LlamaLM):
        self.model = model
        self.failed: str | None = None  # why compiling failed; then everything runs eagerly
        self.compile_seconds: float | None = None  # the first compiled step's forward + backward, compiling included
        self._fn = torch.compile(_block_forward)
        # the loss's fp32 cast, log-softmax and its backward as fused kernels instead of several passes over the
        # [labels, vocab] logits: 2.8x faster for SmolLM2's 49k vocabulary (docs/benchmarks.md, Training step)
        self._loss = torch.compile(summed_cross_entropy, dynamic=True)

    @property
    def enabled(self) -> bool:
        return self.failed is None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around a training step's forward and backward (the backward graph compiles in the backward): the
        compiler's settings, and the time of the first step (the one that waits for the graphs)."""
        import torch._inductor.config  # noqa: F401 - not imported by `import torch`

        first = self.compile_seconds is None
        t0 = time.perf_counter()
        # fallback_random: dropout (LaVIN's adapters) draws its masks with the eager random generator, so a
        # compiled step draws what the eager one would (inductor's own generator would draw others)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
                torch._inductor.config.patch(fallback_random=True):
            yield
        if first and self.failed is None:
            self.compile_seconds = time.perf_counter() - t0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Blocks called in this context (a training forward) run the compiled function, and `lm_loss` the
        compiled cross-entropy."""
        if self.failed is not None:
            yield
            return
        blocks = [m for m in self.model.layers if isinstance(m, Block)]
        for b in blocks:  # an instance attribute, not a module or tensor: state_dict does not see it
            b.__dict__["forward"] = functools.partial(self._fn, b)
        try:
            with cross_entropy_by(self._loss):
                yield
        finally:
            for b in blocks:
                b.__dict__.pop("forward", None)

    def fail(self, error: BaseException) -> None:
        """Give up compiling for this model (warn once); the caller redoes the step eagerly."""
        self.failed = f"{type(error).__name__}: {error}".strip()
        if len(self.failed) > 2000:
            self.failed = self.failed[:2000] + " ..."
        warnings.warn(f"train.compile: compiling the training step failed, training eagerly instead "
                      f"({self.failed})", RuntimeWarning, stacklevel=3)


def compile_unsupported(shard: str) -> str | None:
    """Why train.compile cannot be used with these settings, or None."""
    if shard == "fsdp":
        return "not with train.shard=fsdp (its hooks gather each block's weights around the block's forward)"
    return None

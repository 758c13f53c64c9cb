"""The one training loop for every method.

It knows parameter groups, data kinds and phases, not methods: each step draws a batch of
one data kind, and only the parameter groups that kind trains get gradients and move.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from ..batch import Batch, Example
from ..data.tokenize import collate
from ..device import autocast, resolve_device, resolve_precision, set_threads
from ..loss import lm_loss
from ..model.attached import TrainableAdapter
from ..model.llama import Block, LlamaLM
from .checkpoint import (
    check_same_data,
    data_fingerprint,
    resumable_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .compiled import AUTO_EAGER_STEPS, CompiledBlocks, compile_pays_off, compile_unsupported
from .config import TrainConfig
from .distributed import Dist, all_sum, barrier, init_from_env, shard_frozen_base, sum_gradients
from .faults import (
    CheckpointWriteError,
    NonFiniteStop,
    TrainingInterrupted,
    check_out_dir,
    checkpoint_bytes,
    non_finite,
    remove_stale_temporaries,
)
from .optim import build_optimizer
from .runlog import RunLog, plot_losses
from .schedule import lr_at
from .signals import StopOnSignal


class BatchSampler:
    """Shuffled batches, epoch after epoch; its position is saved for exact resume."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, shuffle: bool = True):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.batch_size, self.seed, self.d, self.shuffle = n, batch_size, seed, d, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self) -> list[int]:
        need = self.batch_size * self.d.world
        picked: list[int] = []
        while len(picked) < need:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = self._order[self.pos: self.pos + need - len(picked)]
            picked += take
            self.pos += len(take)
        return picked[self.d.rank * self.batch_size: (self.d.rank + 1) * self.batch_size]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict[str, int]) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._order = self._permutation()


@dataclass
class TrainResult:
    """What `Trainer.fit` did: steps, last losses, time, throughput and where the adapter was written."""

    steps: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    out_dir: Path
    tokens_per_second: float
    start_step: int = 0  # the step this fit began at: above 0 when it resumed a checkpoint


class Trainer:
    """The one training loop for every method: each step draws a batch of one data kind and moves only the
    parameter groups that kind trains; checkpoints, resume, many processes and faults are handled here."""

    def __init__(self, model: LlamaLM, cfg: TrainConfig, train: Mapping[str, Sequence[Example]],
                 val: Sequence[Example] = (), pad_id: int = 0,
                 collate_fn: Callable[[list[Example]], Batch] | None = None,
                 loss_fn: Callable[[LlamaLM, Batch], torch.Tensor] = lm_loss):
        if model.adapter is None:
            raise ValueError("attach a method before training (la.attach(model, config))")
        set_threads(cfg.threads)
        self.cfg, self.model = cfg, model
        self.adapter: TrainableAdapter = model.adapter  # all the trainer knows of the method
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        if cfg.base_dtype == "bf16" and self.amp_dtype != torch.bfloat16:
            raise ValueError(f"base_dtype bf16 needs bf16 autocast, or the dtypes would not match; precision "
                             f"{cfg.precision!r} gives fp32 on {self.device}")
        self.dist = init_from_env(self.device)
        self.train_sets = {k: list(v) for k, v in train.items() if len(v)}
        if not self.train_sets:
            raise ValueError("no training examples")
        self.val = list(val)
        self.collate = collate_fn or (lambda ex: collate(ex, pad_id))
        self.loss_fn = loss_fn
        self.out_dir = Path(cfg.out_dir)
        self.params = self.adapter.trainable_parameters(model)
        self._place_model()
        self.compiled = self._compiled_blocks()
        # train.compile: auto: the eager steps' times until the decision (None: no decision to make)
        auto = cfg.compile == "auto" and self.device.type == "cpu" and self.dist.world == 1
        self.eager_step_seconds: list[float] | None = [] if auto else None
        self.mix = self._mix()
        self.data_ids = {k: data_fingerprint(v) for k, v in self.train_sets.items()}
        self.samplers = {k: BatchSampler(len(v), cfg.batch_size, cfg.seed + i, self.dist)
                         for i, (k, v) in enumerate(sorted(self.train_sets.items()))}
        self.lr = cfg.learning_rate(self.dist.world)
        self.total_steps = self._total_steps()
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else round(cfg.warmup_epochs * self._steps_per_epoch()))
        self.optimizer = build_optimizer(self.params, self.lr, cfg.weight_decay, cfg.betas,
                                         self.adapter.lr_scales())
        self.kind_params = self._kind_params()
        self.step = 0
        self.bad_in_a_row, self.bad_steps = 0, 0  # skipped steps (non-finite loss or gradient)
        if self.dist.main:
            check_out_dir(self.out_dir, checkpoint_bytes(self.params.values()))
            remove_stale_temporaries(self.out_dir)
        self.log = RunLog(self.out_dir / "log.jsonl", enabled=self.dist.main)

    # -- set-up ---------------------------------------------------------------------------
    def _place_model(self) -> None:
        """The language model's frozen weights in the storage dtype asked for; trainable parameters, and
        what a method attached beside the model (an image encoder with batch-norm statistics), stay fp32."""
        base_dtype = torch.bfloat16 if self.cfg.base_dtype == "bf16" else torch.float32
        trainable = {id(p) for p in self.params.values()}
        base = {id(p) for p in self.model.base_parameters()}
        for p in self.model.parameters():
            dtype = base_dtype if id(p) in base and id(p) not in trainable else torch.float32
            if p.device != self.device or p.dtype != dtype:
                p.data = p.data.to(self.device, dtype)
        for block in cast(list[Block], list(self.model.layers)):
            block.checkpointed = self.cfg.activation_checkpointing
        if self.cfg.shard == "fsdp":  # the frozen block weights only; the rest stays replicated
            outside_blocks = {p for n, p in self.model.named_parameters() if not n.startswith("layers.")}
            shard_frozen_base(self.model.layers, self.model, set(self.params.values()) | outside_blocks, self.dist)

    def _compiled_blocks(self) -> CompiledBlocks | None:
        """train.compile: the decoder blocks' compiled forward (and backward) for training steps."""
        if self.cfg.compile is not True:  # false, or auto: decided after a few eager steps (_decide_compile)
            return None
        why_not = compile_unsupported(self.cfg.shard)
        if why_not is not None:
            warnings.warn(f"train.compile is ignored {why_not}; training eagerly", RuntimeWarning, stacklevel=3)
            return None
        return CompiledBlocks(self.model)

    def _mix(self) -> dict[str, float]:
        kinds = sorted(self.train_sets)
        if not self.cfg.mix:
            if len(kinds) > 1:
                raise ValueError(f"several data kinds {kinds}: set train.mix to their shares of the steps")
            return {kinds[0]: 1.0}
        missing = set(self.cfg.mix) - set(kinds)
        if missing:
            raise ValueError(f"train.mix names data kinds with no examples: {sorted(missing)}")
        total = sum(self.cfg.mix.values())
        return {k: v / total for k, v in self.cfg.mix.items() if v > 0}

    def _steps_per_epoch(self) -> float:
        """Steps for one pass over the data kind with the largest share."""
        main = max(self.mix, key=lambda k: self.mix[k])
        per_step = self.cfg.batch_size * self.cfg.grad_accum * self.dist.world
        return len(self.train_sets[main]) / per_step / self.mix[main]

    def _total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self._steps_per_epoch()))

    def _kind_params(self) -> dict[str, list[str]]:
        """Which parameters each data kind trains (the method's mapping; default: all)."""
        mapping = self.adapter.kind_groups
        groups = self.adapter.groups
        out = {}
        for kind in self.mix:
            names = [n for g in mapping.get(kind, list(groups)) for n in groups[g]]
            if not names:
                raise ValueError(f"data kind {kind!r} trains no parameters")
            out[kind] = names
        return out

    def kind_for_step(self, step: int) -> str:
        if len(self.mix) == 1:
            return next(iter(self.mix))
        r = random.Random(self.cfg.seed * 7_919 + step).random()
        acc = 0.0
        for kind, share in sorted(self.mix.items()):
            acc += share
            if r < acc:
                return kind
        return sorted(self.mix)[-1]

    # -- checkpoints ------------------------------------------------------------------------
    def _resume(self) -> None:
        found = resumable_checkpoint(self.out_dir, print if self.dist.main else None) if self.cfg.resume else None
        if found is None:  # a run from step 0: an earlier run's records in this folder are not its own
            self.log.truncate_after(0)
            return
        folder, state = found
        if "data" in state:  # checkpoints from before the data check have no record of their data
            check_same_data(folder, state["data"], self.data_ids)
        self.adapter.load(self.model, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        for k, s in state["samplers"].items():
            self.samplers[k].load_state(s)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.log.truncate_after(self.step)

    def save(self) -> Path | None:
        if not self.dist.main:
            return None
        extra = {"samplers": {k: s.state() for k, s in self.samplers.items()}, "data": self.data_ids}
        return save_checkpoint(self.out_dir, self.step, lambda folder: self.adapter.save(self.model, folder),
                               self.optimizer, extra)

    # -- the loop -----------------------------------------------------------------------------
    def _batch(self, kind: str) -> Batch:
        data = self.train_sets[kind]
        return self.collate([data[i] for i in self.samplers[kind].next()]).to(self.device)

    def train_step(self) -> dict[str, Any]:
        cfg, kind = self.cfg, self.kind_for_step(self.step)
        active = self.kind_params[kind]
        active_set = set(active)
        for n, p in self.params.items():
            p.requires_grad_(n in active_set)
        self.model.train()
        batches = [self._batch(kind) for _ in range(cfg.grad_accum)]
        (label_tokens,) = all_sum([float(sum(b.n_label_tokens for b in batches))], self.dist, self.device)
        loss_total = self._forward_backward(batches, label_tokens)
        params = [self.params[n] for n in active]
        sum_gradients(params, self.dist)
        (loss_sum,) = all_sum([loss_total], self.dist, self.device)  # a non-finite loss on any rank shows in the sum
        tokens = sum(b.n_tokens for b in batches) * self.dist.world
        bad = non_finite(loss_sum, params)
        lr = lr_at(self.step, self.total_steps, self.warmup, self.lr, cfg.min_lr)
        if bad is None:
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # skipped: no parameter and no optimizer state moves; the batch is consumed
            self.bad_in_a_row += 1
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params.values():
            p.requires_grad_(True)
        self.step += 1
        if bad is not None:
            return {"step": self.step, "kind": kind, "skipped": bad, "bad_in_a_row": self.bad_in_a_row,
                    "bad_steps": self.bad_steps, "lr": lr, "tokens": tokens, "label_tokens": int(label_tokens)}
        return {"step": self.step, "kind": kind, "loss": loss_sum / label_tokens, "lr": lr, "tokens": tokens,
                "label_tokens": int(label_tokens)}

    def _forward_backward(self, batches: list[Batch], label_tokens: float) -> float:
        """Gradients of the step's micro-batches (summed loss / label tokens) in the parameters; their summed loss."""
        compiled = self.compiled
        if compiled is None or not compiled.enabled:
            return self._accumulate(batches, label_tokens, contextlib.nullcontext)
        if compiled.compile_seconds is None and self.dist.main and self.cfg.progress:
            print("train.compile: compiling the decoder blocks in this step (forward and backward; tens of "
                  "seconds on a CPU, once)", flush=True)
        rng = rng_state()  # a failed compile redoes the step eagerly, with the same random draws
        try:
            with compiled.step():
                return self._accumulate(batches, label_tokens, compiled.active)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back to eager
            error = e
        self.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
        loss_total = self._accumulate(batches, label_tokens, contextlib.nullcontext)  # an error of its own: raised
        compiled.fail(error)  # the step runs eagerly, so compiling was what failed
        return loss_total

    def _accumulate(self, batches: list[Batch], label_tokens: float,
                    blocks: Callable[[], contextlib.AbstractContextManager[Any]]) -> float:
        loss_total = 0.0
        for b in batches:
            with autocast(self.device, self.amp_dtype), blocks():
                loss = self.loss_fn(self.model, b)
            (loss / label_tokens).backward()
            loss_total += float(loss.detach())
        return loss_total

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val:
            return None
        self.model.eval()
        shard = self.val[self.dist.rank:: self.dist.world]
        # the same batch count on every rank: a sharded forward all-gathers, so all ranks must run it
        n_batches = math.ceil(math.ceil(len(self.val) / self.dist.world) / self.cfg.batch_size)
        if self.cfg.eval_batches:
            n_batches = min(n_batches, self.cfg.eval_batches)
        loss_sum, tokens = 0.0, 0.0
        for i in range(n_batches):
            rows = shard[i * self.cfg.batch_size: (i + 1) * self.cfg.batch_size]
            b = self.collate(rows or self.val[:1]).to(self.device)  # an idle rank runs a discarded batch
            with autocast(self.device, self.amp_dtype):
                loss = float(self.loss_fn(self.model, b))
            if rows:
                loss_sum, tokens = loss_sum + loss, tokens + b.n_label_tokens
        loss_sum, tokens = all_sum([loss_sum, tokens], self.dist, self.device)
        return loss_sum / max(tokens, 1)

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        torch.manual_seed(self.cfg.seed)
        self._resume()
        start_step, t0 = self.step, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.dist.main),
                   desc="training", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s, not 10/s
        tokens_done, last, val = 0, None, None
        with StopOnSignal() as stop:
            while self.step < self.total_steps:
                tokens_done, loss = self._one_step(bar, t0, tokens_done)
                last = loss if loss is not None else last
                if self.step < self.total_steps and self._stop_requested(stop):  # the last step just finishes
                    bar.close()
                    saved = self.save()
                    barrier(self.dist)  # no rank exits (and has torchrun stop the others) before the save is done
                    raise TrainingInterrupted(self.step, saved, stop.requested or "a signal to another rank")
        bar.close()
        val = self.evaluate()
        if val is not None:
            self.log.write({"step": self.step, "val_loss": val})
        self.save()
        if self.dist.main:
            self._save_final_adapter()
            plot_losses(self.log.records(), self.out_dir / "loss.png", title=f"{self.adapter.method}")
        barrier(self.dist)  # every rank leaves the run together, once rank 0 has written everything
        seconds = time.perf_counter() - t0
        steps_run = self.step - start_step
        return TrainResult(self.step, last, val, seconds, self.out_dir,
                           tokens_done / seconds if steps_run else 0.0, start_step)

    def _save_final_adapter(self) -> None:
        try:
            self.adapter.save(self.model, self.out_dir)
        except OSError as e:
            raise CheckpointWriteError(e.errno, f"could not write the final adapter to {self.out_dir} "
                                                f"({e.strerror or e}); checkpoint-{self.step:07d} there holds the same "
                                                f"weights (la.load_adapter works on it)") from e

    def _stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether any rank got a stop signal: every rank must save (and stop at) the same step."""
        flag = 1.0 if stop.requested else 0.0
        if self.dist.world > 1:
            (flag,) = all_sum([flag], self.dist, self.device)
        return flag > 0

    def _one_step(self, bar: Any, t0: float, tokens_done: int) -> tuple[int, float | None]:
        """One step with its log record, progress bar, evaluation and checkpoint: (tokens so far, its loss)."""
        started = time.perf_counter()
        rec = self.train_step()
        if self.eager_step_seconds is not None:
            self._decide_compile(time.perf_counter() - started)
        elapsed = time.perf_counter() - t0
        tokens_done += rec["tokens"]
        rec.update(tok_per_s=tokens_done / elapsed, elapsed=round(elapsed, 3))
        if "skipped" in rec:
            self._skipped(rec)
        elif self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            self.log.write(rec)
        if "loss" in rec:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}", kind=rec["kind"], refresh=False)
        bar.update(1)
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
            val = self.evaluate()
            if val is not None:
                self.log.write({"step": self.step, "val_loss": val})
        if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
            self.save()
        return tokens_done, rec.get("loss")

    def _decide_compile(self, seconds: float) -> None:
        """train.compile: auto: after the first eager steps, compile the blocks if the rest of the run pays for it."""
        times = self.eager_step_seconds
        assert times is not None
        times.append(seconds)
        if len(times) < AUTO_EAGER_STEPS:
            return
        self.eager_step_seconds = None  # decided once
        step_seconds = sorted(times[1:])[(len(times) - 1) // 2]  # the median, the first step left out
        left = self.total_steps - self.step
        if not compile_pays_off(step_seconds, left):
            return
        self.compiled = CompiledBlocks(self.model)
        if self.cfg.progress:
            print(f"train.compile: auto: {left} steps left at {step_seconds:.2f} s each, enough to pay for compiling",
                  flush=True)

    def _skipped(self, rec: dict[str, Any]) -> None:
        """Log a step skipped for a non-finite loss or gradient; too many in a row stop the run."""
        self.log.write(rec)  # always, whatever log_every
        if self.dist.main:
            print(f"warning: step {self.step} skipped: {rec['skipped']} ({self.bad_in_a_row} in a row, "
                  f"{self.bad_steps} in all)", flush=True)
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise NonFiniteStop(
                f"{self.bad_in_a_row} steps in a row (to step {self.step}) had a non-finite loss or gradient "
                f"(train.max_bad_steps={self.cfg.max_bad_steps}); nothing was learnt from them. Lower the learning "
                f"rate, use precision fp32 or check the data, then resume from the last checkpoint in {self.out_dir}")

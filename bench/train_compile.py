"""Compiled training step: the trainer's V1 step eager and with `train.compile`, against PEFT's AdaptionPrompt.

train_step.py's setting: SmolLM2-135M, batch 4 x 256 tokens of packed Alpaca examples (the same rows, read
the same way), K = 10 prompts in the top 28 layers, AdamW step included. Ours is the library's Trainer
(`Trainer.train_step`: gradient clipping, the non-finite check and the schedule included), once eager and
once with `train.compile: true`, both built from the same seed; PEFT's step is train_step.py's. In each
configuration (fp32; bf16 autocast over fp32 weights; bf16 frozen weights) the three are timed alternately
in one process after warm-up, medians reported. Both of ours take the same batch from the same start at
every step, so their losses are compared step by step.

The wait for compiling is measured in fresh subprocesses (unless --no-probes): the first step of a
compiled trainer with an empty inductor cache (what a first run on a machine waits) and again with the
cache that run left (what later runs wait); the same processes give the peak RSS of steps after the first,
above the loaded model, eager and compiled.

    python bench/train_compile.py [--reps 5] [--warmup 2] [--configs fp32,bf16-autocast,bf16-weights]
    python bench/train_compile.py --reps 1 --warmup 0 --configs fp32 --no-probes --name smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results  # noqa: E402
from train_step import CONFIGS, B, K, L, T, build, packed_batch  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.batch import Example  # noqa: E402
from llama_adapter.train import TrainConfig, Trainer  # noqa: E402

IMPLS = ("eager", "compiled", "peft")
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16-autocast": 1e-3, "bf16-weights": 1e-3}  # relative, step by step


def build_trainer(config: str, compile: bool, out_dir: str, quantize: str | None = None,
                  dtype: str = "fp32") -> Trainer:
    """The library's Trainer on train_step.py's packed batch: every step takes the same 4 rows (on a base loaded
    in `dtype`, and packed to int8/int4 with `quantize`)."""
    torch.manual_seed(0)
    model, tok = la.load_pretrained("smollm2-135m", dtype=dtype, quantize=quantize)
    la.attach(model, la.AdapterV1Config(prompt_len=K, n_layers=L))
    batch = packed_batch(tok)
    rows = [Example(batch.input_ids[i].tolist(), batch.labels[i].tolist(), f"packed-row-{i}") for i in range(B)]
    cfg = TrainConfig(out_dir=out_dir, max_steps=1_000_000, batch_size=B, lr=1e-3, warmup_steps=0,
                      precision="fp32" if config == "fp32" else "bf16",
                      base_dtype="bf16" if config == "bf16-weights" else "fp32",
                      device="cpu", threads=bench_threads(), progress=False, seed=0, compile=compile)
    return Trainer(model, cfg, {"instruction": rows}, pad_id=tok.pad_id)


def trainer_step(trainer: Trainer):
    def step() -> float:
        return float(trainer.train_step().get("loss", float("nan")))
    return step


def timed(fn) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fn()
    return time.perf_counter() - t0, loss


def compile_probe(config: str, compile: bool) -> None:
    """In a subprocess: the first step's time (compiling included), the next steps' times, and the peak RSS
    of those steps above the RSS after the first (so the compiler's own memory does not count)."""
    torch.set_num_threads(bench_threads())
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(config, compile, out)
        step = trainer_step(trainer)
        first, _ = timed(step)
        before = rss_bytes()
        reset_peak_rss()
        later = [timed(step)[0] for _ in range(3)]
        peak = peak_rss_bytes()
    failed = trainer.compiled.failed if trainer.compiled is not None else None
    print(json.dumps({"first_step": first, "later_steps": later, "peak_above_first": peak - before,
                      "compile_failed": failed}))


def run_probe(config: str, compile: bool, cache_dir: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, __file__, "--probe", config, "compiled" if compile else "eager"],
                         check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    return json.loads(out)


def probe_table(probes: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| configuration | first compiled step, empty cache (s) | first compiled step, warm cache (s) "
             "| later compiled steps (s) | later eager steps (s) | peak MB above the first step: eager / compiled |",
             "|---|---|---|---|---|---|"]
    for c, p in probes.items():
        cold, warm, eager = p["compiled_cold_cache"], p["compiled_warm_cache"], p["eager"]
        lines.append(f"| {c} | {cold['first_step']:.1f} | {warm['first_step']:.1f} | "
                     f"{statistics.median(warm['later_steps']):.2f} | {statistics.median(eager['later_steps']):.2f} | "
                     f"{eager['peak_above_first'] / 2**20:.0f} / {warm['peak_above_first'] / 2**20:.0f} |")
        failed = {k: v["compile_failed"] for k, v in p.items() if v["compile_failed"]}
        if failed:
            lines.append(f"| {c}: compiling FAILED in the probes: {failed} | | | | | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (each: one step of every implementation)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each implementation before timing")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--no-probes", action="store_true", help="skip the subprocesses that time a cold and a warm "
                                                             "compile and measure memory")
    ap.add_argument("--probe", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--name", default="train_compile", help="results file name (one per machine type)")
    args = ap.parse_args()
    if args.probe:
        compile_probe(args.probe[0], args.probe[1] == "compiled")
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown or not configs:
        ap.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(bench_threads())

    probes: dict[str, dict[str, Any]] = {}
    if not args.no_probes:
        for config in configs:
            with tempfile.TemporaryDirectory() as cache:
                probes[config] = {"compiled_cold_cache": run_probe(config, True, cache),
                                  "compiled_warm_cache": run_probe(config, True, cache),
                                  "eager": run_probe(config, False, cache)}

    tmp = tempfile.TemporaryDirectory()
    steps: dict[tuple[str, str], Any] = {}
    trainers: dict[tuple[str, str], Trainer] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    first_step: dict[str, float] = {}
    peft_trainable, label_tokens = 0, 0
    for config in configs:
        for impl in ("eager", "compiled"):
            trainers[(impl, config)] = t = build_trainer(config, impl == "compiled", f"{tmp.name}/{impl}-{config}")
            steps[(impl, config)] = trainer_step(t)
        steps[("peft", config)], peft_trainable, batch = build("peft", config)
        label_tokens = batch.n_label_tokens
        # the first step of each (the compiled one compiles here, in this process), then the warm-up, in lockstep
        for impl in IMPLS:
            seconds, loss = timed(steps[(impl, config)])
            losses[(impl, config)] = [loss]
            if impl == "compiled":
                first_step[config] = seconds
        for _ in range(args.warmup):
            for impl in IMPLS:
                losses[(impl, config)].append(steps[(impl, config)]())

    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for config in configs:
            for impl in IMPLS:  # alternate eager / compiled / PEFT
                seconds, loss = timed(steps[(impl, config)])
                times[(impl, config)].append(seconds)
                losses[(impl, config)].append(loss)
    med = {k: statistics.median(v) for k, v in times.items()}

    loss_check = {}
    for config in configs:
        eager, compiled = losses[("eager", config)], losses[("compiled", config)]
        rel = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
        loss_check[config] = {"eager": eager, "compiled": compiled, "max_relative_difference": rel,
                              "tolerance": LOSS_TOLERANCE[config], "equal": rel <= LOSS_TOLERANCE[config]}
    failed = {}  # configuration -> why compiling failed (its "compiled" trainer then ran eagerly)
    for c in configs:
        compiled = trainers[("compiled", c)].compiled
        if compiled is None or compiled.failed:
            failed[c] = compiled.failed if compiled is not None else "not compiled"
    ours_trainable = sum(p.numel() for p in trainers[("eager", configs[0])].params.values())
    tmp.cleanup()

    best = {impl: min(configs, key=lambda c: med[(impl, c)]) for impl in IMPLS}
    b_eager, b_comp, b_peft = (med[(i, best[i])] for i in IMPLS)
    ours_best = min(b_eager, b_comp)
    figures: dict[str, Any] = {
        "batch": [B, T], "prompt_len": K, "adapted_layers": L, "label_tokens": label_tokens,
        "threads": bench_threads(), "reps": args.reps, "warmup": args.warmup,
        "trainable": {"ours": ours_trainable, "peft": peft_trainable},
        "step_seconds_median": {f"{i}/{c}": med[(i, c)] for i, c in med},
        "step_seconds_all": {f"{i}/{c}": v for (i, c), v in times.items()},
        "compiled_first_step_seconds_in_process": first_step,
        "compile_probes": probes, "compile_failed": failed, "losses": loss_check,
        "best_config": best,
        "compiled_vs_eager_same_config": {c: med[("eager", c)] / med[("compiled", c)] for c in configs},
        "compiled_best_vs_eager_best": b_eager / b_comp,
        "peft_best_vs_eager_best": b_peft / b_eager,
        "peft_best_vs_compiled_best": b_peft / b_comp,
        "targets": {"compiled_at_least_1.2x_eager_best": b_eager / b_comp >= 1.2,
                    "ours_best_at_least_2x_peft_best": b_peft / ours_best >= 2.0,
                    "losses_equal": all(v["equal"] for v in loss_check.values()) and not failed},
    }

    lines = ["| configuration | eager trainer (s/step) | compiled trainer (s/step) | PEFT AdaptionPrompt (s/step) "
             "| eager / compiled | PEFT / compiled | first compiled step here (s) | losses: max rel. difference |",
             "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        lines.append(f"| {c} | {med[('eager', c)]:.2f} | {med[('compiled', c)]:.2f} | {med[('peft', c)]:.2f} | "
                     f"{med[('eager', c)] / med[('compiled', c)]:.2f}x | {med[('peft', c)] / med[('compiled', c)]:.2f}x"
                     f" | {first_step[c]:.1f} | {loss_check[c]['max_relative_difference']:.1e} |")
    lines += ["", f"Best vs best: eager {best['eager']} {b_eager:.2f} s, compiled {best['compiled']} {b_comp:.2f} s, "
              f"PEFT {best['peft']} {b_peft:.2f} s: compiled **{b_eager / b_comp:.2f}x** the eager step "
              f"(default where >= 1.2x), ours **{b_peft / ours_best:.2f}x** PEFT's (target >= 2x; eager alone "
              f"{b_peft / b_eager:.2f}x)."]
    if probes:
        lines += ["", *probe_table(probes)]
    lines += ["", "Losses: both trainers start from the same seed and take the same batch each step; the largest "
              f"relative difference over {1 + args.warmup + args.reps} steps (tolerance fp32 "
              f"{LOSS_TOLERANCE['fp32']:.0e}, bf16 {LOSS_TOLERANCE['bf16-autocast']:.0e}): "
              + ", ".join(f"{c} {v['max_relative_difference']:.1e} ({'equal' if v['equal'] else 'NOT equal'})"
                          for c, v in loss_check.items()) + "."]
    if failed:
        lines += ["", f"Compiling FAILED (the compiled trainer ran eagerly): {failed}"]
    lines += ["", f"Ours is the Trainer's whole step (clipping and the non-finite check included); PEFT's is "
              f"train_step.py's. Trainable parameters: ours {ours_trainable:,}, PEFT {peft_trainable:,}. "
              f"{bench_threads()} threads."]
    table = "\n".join(lines) + "\n"
    write_results(args.name, figures, table, machine_info(("transformers", "peft")))
    print(table)


if __name__ == "__main__":
    main()

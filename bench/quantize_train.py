"""Training through the Trainer on a quantized frozen base: step time and peak memory against bf16.

train_step.py's setting (SmolLM2-135M, batch 4 x 256 tokens of packed Alpaca, V1 with K = 10 prompts in the top
28 layers, AdamW), the library's Trainer with the frozen base in bf16 (`base_dtype: bf16`, bf16 autocast), its
linears as bf16 weights or packed to int8 or int4 (`model.quantize`); each base loaded in bf16 from the start,
in a fresh process. Reported: the model's tensor bytes, the RSS after building the trainer, the peak RSS over
the steps and the peak above that RSS (what a step adds), the median step time after one warm-up step, and the
losses. Writes bench/results/quantize_train.json and .md.

    python bench/quantize_train.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results  # noqa: E402
from train_compile import build_trainer  # noqa: E402

BASES = {"bf16": None, "int8": "int8", "int4": "int4"}


def probe(base: str, steps: int) -> None:
    """In this (fresh) process: build the trainer, one warm-up step, then `steps` timed steps."""
    torch.set_num_threads(bench_threads())
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer("bf16-weights", False, out, quantize=BASES[base], dtype="bf16")
        model = trainer.model
        tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers()]}
        loaded = rss_bytes()
        reset_peak_rss()
        losses = [float(trainer.train_step()["loss"])]
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(float(trainer.train_step()["loss"]))
            times.append(time.perf_counter() - t0)
        peak = peak_rss_bytes()
    print(json.dumps({"tensor_bytes": sum(tensors.values()), "rss_loaded": loaded, "peak_rss": peak,
                      "step_s": statistics.median(times), "times": times,
                      "losses": losses}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--name", default="quantize_train")
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.steps)
        return
    rows = {}
    for base in BASES:
        out = subprocess.run([sys.executable, __file__, "--probe", base, "--steps", str(args.steps)], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[base] = json.loads(out)
        print(base, rows[base], flush=True)
    ref = rows["bf16"]
    machine = machine_info()
    lines = ["# Training V1 through the Trainer on a quantized base, SmolLM2-135M, batch 4 x 256, bf16 base",
             "", f"Machine: {machine['cpu']}, {machine['usable_cpus']} CPUs, {bench_threads()} threads; torch "
             f"{machine['torch']}; {machine['date']}. Command: `{machine['command']}`. Each base in a fresh process; "
             f"median of {args.steps} steps after one warm-up step.", "",
             "| base | step s | vs bf16 | model tensors, MB | RSS loaded, MB | peak RSS, MB | peak vs bf16 "
             "| step adds, MB | loss, first -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for base, r in rows.items():
        lines.append(f"| {base} | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x | "
                     f"{r['tensor_bytes'] / 2**20:.0f} | {r['rss_loaded'] / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{r['peak_rss'] / ref['peak_rss']:.2f}x | {(r['peak_rss'] - r['rss_loaded']) / 2**20:.0f} | "
                     f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    js, md = write_results(args.name, {"steps": args.steps, "rows": rows}, "\n".join(lines), machine)
    print("\n".join(lines))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()

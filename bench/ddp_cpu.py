"""Two processes x 1 thread (torchrun, gloo) against one process x 2 threads, on the same global batch.

The point on a CPU is correctness, not speed: the same steps give the same losses, and the
speed ratio (tokens/s of the two-process run over the one-process run) is expected near 1.
Real model and data: SmolLM2-135M (embedded) with LLaMA-Adapter V1 on the Alpaca 1k sample.
Writes bench/results/ddp_cpu.json and .md.

    python bench/ddp_cpu.py [--steps 12] [--batch 8] [--max-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_1k.json"


def run(recipe: Path, out: Path, nproc: int, batch: int, threads: int) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    head = [sys.executable, "-m"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd = head + ["llama_adapter.cli", "finetune", "--recipe", str(recipe), f"train.out_dir={out}",
                  f"train.batch_size={batch}", f"train.threads={threads}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln]


def rate(log: list[dict], skip: int) -> float:
    """Tokens/s over the steps after the first `skip` (start-up and the first step's warm-up excluded)."""
    steps = [r for r in log if "loss" in r]
    first, last = steps[skip - 1], steps[-1]
    tokens = sum(r["tokens"] for r in steps[skip:])
    return tokens / (last["elapsed"] - first["elapsed"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="global batch (each of two processes takes half)")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if a.batch % 2:
        raise SystemExit("--batch must be even")
    tree = {"model": "smollm2-135m",
            "method": {"name": "adapter_v1", "prompt_len": 10, "n_layers": 30},
            "data": {"train": str(ALPACA), "format": "alpaca", "template": "alpaca", "max_len": a.max_len,
                     "on_long_prompt": "skip"},
            "train": {"max_steps": a.steps, "lr": 5e-3, "warmup_steps": 0, "precision": "fp32", "device": "cpu",
                      "progress": False, "seed": 0}}
    with tempfile.TemporaryDirectory(prefix="ddp_cpu_") as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree))
        t0, load_before = time.time(), os.getloadavg()
        one = run(recipe, Path(tmp) / "one", 1, a.batch, 2)
        two = run(recipe, Path(tmp) / "two", 2, a.batch // 2, 1)
        # a reference that tells thread scaling apart from the process group: one process, one thread
        single = run(recipe, Path(tmp) / "single", 1, a.batch, 1)
        wall = time.time() - t0
    l1 = [r["loss"] for r in one if "loss" in r]
    l2 = [r["loss"] for r in two if "loss" in r]
    max_rel = max(abs(x - y) / abs(x) for x, y in zip(l1, l2))
    r1, r2, r0 = rate(one, 2), rate(two, 2), rate(single, 2)
    res = {
        "command": "python bench/ddp_cpu.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "contention": ("other jobs competed for the cores: timings are noisy" if max(load_before[0], os.getloadavg()[0])
                       > 1.5 else "a quiet machine"),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": "smollm2-135m + adapter_v1 (K=10, L=30)", "data": "alpaca_data_1k", "global_batch": a.batch,
        "max_len": a.max_len, "steps": a.steps, "timed_steps": a.steps - 2,
        "one_process_2_threads_tokens_per_s": round(r1, 1), "two_processes_1_thread_tokens_per_s": round(r2, 1),
        "one_process_1_thread_tokens_per_s": round(r0, 1),
        "ratio_two_over_one": round(r2 / r1, 3), "losses_one": l1, "losses_two": l2,
        "max_relative_loss_difference": max_rel, "wall_seconds": round(wall, 1),
    }
    out = Path(a.out)
    (out / "ddp_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Two processes x 1 thread vs one process x 2 threads (CPU, gloo), {res['date']}", "",
          f"Command: `{res['command']}`; machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} CPUs, "
          f"torch {res['machine']['torch']}. "
          f"Load: {res['contention']} (1-minute load average {res['load_average_before_after'][0]} before, "
          f"{res['load_average_before_after'][1]} after).", "",
          f"{res['model']} on {res['data']}, global batch {a.batch}, max_len {a.max_len}, {a.steps} steps "
          f"(the first 2 not timed).", "",
          "| run | tokens/s |", "|---|---:|",
          f"| 1 process x 2 threads, batch {a.batch} | {res['one_process_2_threads_tokens_per_s']} |",
          f"| torchrun 2 processes x 1 thread, batch {a.batch // 2} each | "
          f"{res['two_processes_1_thread_tokens_per_s']} |",
          f"| reference: 1 process x 1 thread, batch {a.batch} | {res['one_process_1_thread_tokens_per_s']} |", "",
          f"Ratio (two processes / one): **{res['ratio_two_over_one']}**. Largest relative difference of the "
          f"step losses between the two runs: {max_rel:.2e}.", ""]
    (out / "ddp_cpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

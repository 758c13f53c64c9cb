"""Training-step speed and memory: our LLaMA-Adapter V1 against PEFT's AdaptionPrompt.

SmolLM2-135M, batch 4 x 256 tokens of packed Alpaca examples (loss on responses only),
K = 10 prompts in the top 28 layers for both, AdamW step included. Each implementation in
three configurations (fp32; bf16 autocast over fp32 weights; bf16 frozen weights), timed
alternately in one process after warm-up, medians reported. Peak memory: each
configuration again in a fresh subprocess, peak RSS of one step above the RSS after
loading (so the allocator's reuse across configurations cannot hide anything).

    python bench/train_step.py [--reps 5] [--name train_step]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.data.formats import read_alpaca  # noqa: E402
from llama_adapter.data.templates import alpaca_prompt  # noqa: E402
from llama_adapter.data.tokenize import IGNORE, Batch, encode_pair  # noqa: E402
from llama_adapter.device import autocast  # noqa: E402
from llama_adapter.loss import lm_loss  # noqa: E402
from llama_adapter.model.load import resolve_model_path  # noqa: E402
from llama_adapter.train.optim import build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_1k.json"
B, T, K, L = 4, 256, 10, 28
CONFIGS = ("fp32", "bf16-autocast", "bf16-weights")
IMPLS = ("ours", "peft")


def packed_batch(tok) -> Batch:
    """4 rows of exactly 256 tokens, packed from Alpaca examples; labels on responses only."""
    rows_ids, rows_labels, ids, labels = [], [], [], []
    for r in read_alpaca(ALPACA):
        ex = encode_pair(tok, alpaca_prompt(r.instruction, r.input), r.output, T, "alpaca")
        ids += ex.input_ids
        labels += ex.labels
        if len(ids) >= T:
            rows_ids.append(ids[:T])
            rows_labels.append(labels[:T])
            ids, labels = [], []
            if len(rows_ids) == B:
                break
    input_ids, lab = torch.tensor(rows_ids), torch.tensor(rows_labels)
    return Batch(input_ids, lab, "instruction", int((lab[:, 1:] != IGNORE).sum()))


def build(impl: str, config: str):
    """(step function, trainable parameter count) for one implementation and configuration."""
    weights = torch.bfloat16 if config == "bf16-weights" else torch.float32
    amp = torch.bfloat16 if config != "fp32" else None
    cpu = torch.device("cpu")
    if impl == "ours":
        torch.manual_seed(0)
        model, tok = la.load_pretrained("smollm2-135m", dtype=weights)
        la.attach(model, la.AdapterV1Config(prompt_len=K, n_layers=L))
        params = la.trainable_parameters(model)
        batch = packed_batch(tok)
        opt = build_optimizer(params, 1e-3, 0.02, (0.9, 0.95))
        model.train()

        def step():
            with autocast(cpu, amp):
                loss = lm_loss(model, batch) / batch.n_label_tokens
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        from peft import AdaptionPromptConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        folder = str(resolve_model_path("smollm2-135m"))
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=weights)
        model = get_peft_model(base, AdaptionPromptConfig(adapter_len=K, adapter_layers=L, task_type="CAUSAL_LM"))
        for p in model.parameters():  # trainable parameters in fp32, as ours
            if p.requires_grad:
                p.data = p.data.float()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        _, tok = la.load_pretrained("smollm2-135m")
        batch = packed_batch(tok)
        opt = build_optimizer(params, 1e-3, 0.02, (0.9, 0.95))
        model.train()

        def step():
            with autocast(cpu, amp):
                loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    return step, sum(p.numel() for p in params.values()), batch


def memory_probe(impl: str, config: str) -> None:
    """Run in a subprocess: the peak RSS of training steps above the loaded model. The peak is
    reset after loading (writing 5 to /proc/self/clear_refs), so load-time spikes do not count."""
    torch.set_num_threads(2)
    step, _, _ = build(impl, config)
    before = rss_bytes()
    reset_peak_rss()
    for _ in range(2):  # the second step also holds the optimizer state
        step()
    peak = peak_rss_bytes()
    print(json.dumps({"peak_above_loaded": peak - before, "loaded": before, "peak": peak}))


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def step_flops(model_params: int, tokens: int, cfg) -> float:
    """4 x parameters x tokens (forward 2PT, backward through activations 2PT; no weight
    gradients for a frozen base), plus causal attention: QK^T and AV, 2*T^2*d*H each per layer
    forward with causal halving, x3 for forward + backward."""
    attention = 3 * 2 * B * T * T * cfg.head_dim * cfg.n_heads * cfg.n_layers
    return 4 * model_params * tokens + attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-probe", nargs=2, metavar=("IMPL", "CONFIG"))
    ap.add_argument("--name", default="train_step", help="results file name (one per machine type)")
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    torch.set_num_threads(2)

    steps, counts = {}, {}
    for impl in IMPLS:
        for config in CONFIGS:
            fn, n, batch = build(impl, config)
            steps[(impl, config)], counts[impl] = fn, n
            for _ in range(args.warmup):
                fn()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for config in CONFIGS:
            for impl in IMPLS:  # alternate ours / theirs
                t0 = time.perf_counter()
                steps[(impl, config)]()
                times[(impl, config)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    memory = {}
    for impl in IMPLS:
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", impl, config], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            memory[(impl, config)] = json.loads(out)

    model, _ = la.load_pretrained("smollm2-135m")
    n_params = sum(p.numel() for p in model.parameters())
    flops = step_flops(n_params, B * T, model.config)
    bf16_rate, fp32_rate = matmul_rate(torch.bfloat16), matmul_rate(torch.float32)
    fastest_dtype, fastest_rate = max((("bf16", bf16_rate), ("fp32", fp32_rate)), key=lambda r: r[1])
    best = {impl: min(CONFIGS, key=lambda c: med[(impl, c)]) for impl in IMPLS}
    ours_best, peft_best = med[("ours", best["ours"])], med[("peft", best["peft"])]
    figures = {
        "batch": [B, T], "prompt_len": K, "adapted_layers": L, "label_tokens": batch.n_label_tokens,
        "trainable": counts, "step_seconds_median": {f"{i}/{c}": med[(i, c)] for i, c in med},
        "step_seconds_all": {f"{i}/{c}": v for (i, c), v in times.items()},
        "best_config": best, "speedup_best_vs_best": peft_best / ours_best,
        "nominal_step_flops": flops, "bf16_matmul_flops_per_s": bf16_rate, "fp32_matmul_flops_per_s": fp32_rate,
        "ours_best_fraction_of_bf16_matmul_rate": flops / ours_best / bf16_rate,
        "peft_best_fraction_of_bf16_matmul_rate": flops / peft_best / bf16_rate,
        "ours_best_fraction_of_fastest_matmul_rate": flops / ours_best / fastest_rate,
        "peft_best_fraction_of_fastest_matmul_rate": flops / peft_best / fastest_rate,
        "peak_memory_above_loaded_bytes": {f"{i}/{c}": m["peak_above_loaded"] for (i, c), m in memory.items()},
        "peak_rss_bytes": {f"{i}/{c}": m["peak"] for (i, c), m in memory.items()},
        "targets": {"step_time_at_most_1/1.3_of_peft": ours_best <= peft_best / 1.3,
                    "at_least_55pct_of_bf16_matmul_rate": flops / ours_best / bf16_rate >= 0.55,
                    "peak_memory_not_above_peft_in_best_configs":
                        memory[("ours", best["ours"])]["peak"] <= memory[("peft", best["peft"])]["peak"]},
    }
    lines = ["| configuration | ours V1 (s/step) | PEFT AdaptionPrompt (s/step) | PEFT / ours | "
             "peak MB above loaded: ours / PEFT |", "|---|---|---|---|---|"]
    for c in CONFIGS:
        mo, mp = memory[("ours", c)]["peak_above_loaded"] / 2**20, memory[("peft", c)]["peak_above_loaded"] / 2**20
        lines.append(f"| {c} | {med[('ours', c)]:.2f} | {med[('peft', c)]:.2f} | "
                     f"{med[('peft', c)] / med[('ours', c)]:.2f}x | {mo:.0f} / {mp:.0f} |")
    lines += ["", f"Best vs best: ours {best['ours']} {ours_best:.2f} s, PEFT {best['peft']} {peft_best:.2f} s: "
              f"**{peft_best / ours_best:.2f}x** (target >= 1.3x).",
              f"Nominal FLOPs per step {flops / 1e9:.0f} G (4 x {n_params / 1e6:.1f}M params x {B * T} tokens "
              f"+ attention); measured bf16 matmul {bf16_rate / 1e9:.0f} GFLOP/s: ours reaches "
              f"**{flops / ours_best / bf16_rate:.0%}** of it (target >= 55%), "
              f"PEFT {flops / peft_best / bf16_rate:.0%}.",
              f"The faster matmul on this CPU is {fastest_dtype} at {fastest_rate / 1e9:.0f} GFLOP/s "
              f"(fp32 {fp32_rate / 1e9:.0f}, bf16 {bf16_rate / 1e9:.0f}): ours reaches "
              f"{flops / ours_best / fastest_rate:.0%} of it, PEFT {flops / peft_best / fastest_rate:.0%}.",
              f"Trainable parameters: ours {counts['ours']:,} (per-head gates), "
              f"PEFT {counts['peft']:,} (scalar gates)."]
    table = "\n".join(lines) + "\n"
    write_results(args.name, figures, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()

"""The quantized frozen base on the embedded SmolLM2-135M: memory, decode speed, held-out NLL.

For fp32, bf16, int8 and int4 (the quantized bases are loaded in bf16; their embedding/head table is of their
kind, or int8 where a 4-bit table's rows cannot be read back on this CPU: column "table"; norms bf16): the
loaded model's tensor bytes; batch-1 and batch-8 greedy decode tokens/s through `la.generate`
(contenders alternate round by round, one warm-up each, medians); the held-out Alpaca response NLL
(`llama_adapter.eval.nll`, docs/evaluation.md) of the base; optionally a V1 adapter trained briefly on the
bf16 and on the int8 base (`--v1-steps`). The plain rows decode eagerly (the default compiled step switched
off); `--compiled` adds bf16, int8 and int4 with `enable_compiled_decode` (batch 1; a compile of tens of seconds
first). Writes bench/results/<name>.json and .md.

    .venv/bin/python bench/quantize.py [--compiled] [--v1-steps 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import machine_info, median, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.eval.nll import held_out_alpaca, response_nll  # noqa: E402

ALPACA = Path("/work/shared/data/alpaca")
PROMPT = "Give three tips for staying healthy."
TARGETS = {"int8": {"speed": 1.5, "memory": 0.55, "nll": 0.01}, "int4": {"memory": 0.35, "nll": 0.03}}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors (parameters and buffers; the tied embedding/head counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def table_kind(model: torch.nn.Module) -> str:
    """The embedding/head table's storage: its quantized kind, or the float dtype."""
    table = getattr(model.lm_head, "table", None)
    return table.kind if table is not None else str(model.lm_head.weight.dtype).removeprefix("torch.")


def load(kind: str) -> tuple[la.LlamaLM, Any]:
    base = kind.removesuffix("-compiled")
    dtype, quantize = ("fp32", None) if base == "fp32" else ("bf16", None if base == "bf16" else base)
    model, tok = la.load_pretrained(dtype=dtype, quantize=quantize, progress=False)
    if kind.endswith("-compiled"):
        la.enable_compiled_decode(model)
    else:
        la.disable_compiled_decode(model)
    return model, tok


def decode_runner(model, tok, batch: int, n: int):
    free = copy.copy(tok)
    free.eos_ids = {-1}  # never stop early: decode exactly n tokens per row
    prompts = [PROMPT] * batch

    def run() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            la.generate(model, free, prompts, max_new_tokens=n, chat=True)
        return batch * n / (time.perf_counter() - t)
    return run


def train_v1(model, tok, steps: int, batch_size: int = 4) -> None:
    """A short V1 training (AdamW at the CPU recipe's lr 5e-3, no warm-up, bf16 autocast) on the Alpaca 1k sample."""
    from llama_adapter.data.formats import read_alpaca
    from llama_adapter.data.instructions import encode_records
    from llama_adapter.data.sources import DataConfig
    from llama_adapter.data.tokenize import collate
    from llama_adapter.loss import lm_loss

    torch.manual_seed(0)
    la.attach(model, la.AdapterV1Config())
    examples = encode_records(read_alpaca(ALPACA / "alpaca_data_1k.json"), tok,
                              DataConfig(train="-", template="alpaca", max_len=256, on_long_prompt="skip"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    for step in range(steps):
        batch = collate(examples[step * batch_size:(step + 1) * batch_size], tok.pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, batch) / batch.n_label_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per decode run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nll-records", type=int, default=64)
    ap.add_argument("--compiled", action="store_true", help="add bf16, int8, int4 with enable_compiled_decode")
    ap.add_argument("--v1-steps", type=int, default=0, help="train V1 this many steps on bf16 and int8 (0: skip)")
    ap.add_argument("--name", default="quantize")
    args = ap.parse_args()
    t0 = time.perf_counter()
    kinds = ["fp32", "bf16", "int8", "int4"] + (["bf16-compiled", "int8-compiled", "int4-compiled"]
                                                if args.compiled else [])
    models = {k: load(k) for k in kinds}
    rows: dict[str, dict[str, Any]] = {k: {"bytes": model_bytes(m), "table": table_kind(m)}
                                       for k, (m, _) in models.items()}
    held = held_out_alpaca(ALPACA / "alpaca_data_1k.json", ALPACA / "alpaca_small_2k.json", args.nll_records)
    for k in ("fp32", "bf16", "int8", "int4"):
        m, tok = models[k]
        rows[k]["nll"] = round(response_nll(m, tok, held), 4)
    for batch in (1, 8):
        # the compiled graph is specialised to the batch size: batch 1 only (another compile otherwise)
        runners = {k: decode_runner(m, tok, batch, args.tokens) for k, (m, tok) in models.items()
                   if batch == 1 or not k.endswith("-compiled")}
        for run in runners.values():  # warm-up (and the compile, for the compiled rows)
            run()
        speeds: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for k, run in runners.items():
                speeds[k].append(run())
        for k, v in speeds.items():
            rows[k][f"tok_s_b{batch}"] = round(median(v), 1)
    if args.v1_steps:
        for k in ("bf16", "int8"):
            m, tok = load(k)
            start = time.perf_counter()
            train_v1(m, tok, args.v1_steps)
            rows[k]["v1_train_s"] = round(time.perf_counter() - start, 1)
            rows[k]["v1_nll"] = round(response_nll(m, tok, held), 4)
    checks = verdicts(rows, args.compiled, args.v1_steps > 0)
    result = {"machine": machine_info(), "args": vars(args), "rows": rows, "checks": checks,
              "wall_s": round(time.perf_counter() - t0, 1), "load_average_1min_after": round(os.getloadavg()[0], 2)}
    write_results(args.name, result, to_markdown(result))
    print(to_markdown(result))


def verdicts(rows: dict[str, dict[str, Any]], compiled: bool, trained: bool) -> list[dict[str, Any]]:
    bf16 = rows["bf16"]
    out = []

    def check(what: str, value: float, target: float, ok: bool) -> None:
        out.append({"check": what, "value": round(value, 4), "target": target, "result": "PASS" if ok else "MISS"})

    pairs = [("int8", "bf16")] + ([("int8-compiled", "bf16-compiled"), ("int4-compiled", "bf16-compiled")]
                                  if compiled else [])
    for k, ref in pairs:
        ratio = rows[k]["tok_s_b1"] / rows[ref]["tok_s_b1"]
        check(f"{k} batch-1 tok/s vs {ref}", ratio, 1.5, ratio >= 1.5)
    for k in ("int8", "int4"):
        ratio = rows[k]["bytes"] / bf16["bytes"]
        check(f"{k} memory / bf16", ratio, TARGETS[k]["memory"], ratio <= TARGETS[k]["memory"])
        rel = rows[k]["nll"] / bf16["nll"] - 1
        check(f"{k} base NLL vs bf16 (relative)", rel, TARGETS[k]["nll"], rel <= TARGETS[k]["nll"])
    if trained:
        rel = rows["int8"]["v1_nll"] / bf16["v1_nll"] - 1
        check("V1 trained on int8: NLL vs on bf16 (relative)", rel, 0.01, rel <= 0.01)
    return out


def to_markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["rows"]
    lines = [f"# Quantized base: SmolLM2-135M ({m['cpu']}, {m['torch_threads']} threads, torch {m['torch']})", "",
             f"`{m['command']}` on {m['date']}, {result['wall_s']} s; 1-minute load average after the run "
             f"{result.get('load_average_1min_after', '?')} on {m['usable_cpus']} cores. Quantized bases load in "
             "bf16: block linears int8/int4, the tied embedding/head table as in column table, "
             "norms bf16. Bytes: distinct parameter and buffer tensors.", "",
             "| base | table | MB | vs bf16 | held-out NLL | batch-1 tok/s | batch-8 tok/s |",
             "|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        nll = f"{r['nll']:.4f}" if "nll" in r else "-"
        lines.append(f"| {k} | {r.get('table', '-')} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['bytes'] / rows['bf16']['bytes']:.1%} | {nll} | "
                     f"{r['tok_s_b1']} | {r.get('tok_s_b8', '-')} |")
    if "v1_nll" in rows["bf16"]:
        steps = result["args"]["v1_steps"]
        lines += ["", f"V1 trained {steps} steps x batch 4 (bf16 autocast, AdamW lr 5e-3):", "",
                  "| base | train s | held-out NLL |", "|---|---|---|"]
        lines += [f"| {k} | {rows[k]['v1_train_s']} | {rows[k]['v1_nll']:.4f} |" for k in ("bf16", "int8")]
    lines += ["", "| check | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {c['target']} | {c['result']} |" for c in result["checks"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

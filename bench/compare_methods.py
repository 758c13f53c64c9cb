"""The method comparison: SmolLM2-135M on the ScienceQA development protocol, and held-out
Alpaca response NLL, at an equal number of training steps on the same data.

ScienceQA rows (recipes/scienceqa_dev_protocol.md: train on train/val + dev pid%4==0, validate
on dev pid%4==2): zero-shot, V1, V1 multimodal, V2 without and with images, LaVIN without and
with images, PEFT's AdaptionPrompt and PEFT's LoRA (rank 8 on q and v). Every trained row uses
our trainer (same sampler, schedule, AdamW, bf16 autocast), the plain template and the same
conversations; rows with images get the problem's image through their method, the others the
text alone. Accuracy is ranked-choice (the option whose "The answer is X." is most likely),
because a 135M model formats poorly; with --answer-form choice the answers name the choice's
text ("The answer is blue.") in training and scoring instead of its letter. V2 with images
alternates text-only steps (its instruction group) with image steps (its visual group) on the
same problems, as its joint training does. With --experts, the rows with images also get the experts' texts about
the image (ScienceQA's captions.json and ocrs.json) in the context, as V2 reads images through experts; the
diagnostic rows "zero-shot (expert texts)", "V2 (expert texts, no images)" and "LaVIN (expert texts, no images)"
get the texts alone. The diagnostic row "full fine-tune" trains every weight of the model: the reference for what
the base model reaches on this data and budget.
Each of our rows takes the method options and learning rate of its committed CPU recipe
(recipes/*_cpu.yaml); PEFT's AdaptionPrompt takes V1's learning rate, being the same method.

Alpaca rows: trained on alpaca_data_1k.json, scored by the mean per-token NLL of the reference
responses of the alpaca_small_2k.json records whose instruction is not in the 1k file.

Each trained row runs in its own subprocess, so its peak memory (VmHWM after loading, reset
before training) is its own.

The training problems' choices are shuffled per pid (recipes/scienceqa_dev_protocol.md), and each ScienceQA row
also reports how often it picks (B) on the two-choice validation problems, which shows a position preference.
Rows are paired (the same validation problems), so each trained row's difference from zero-shot, and V1 against
PEFT's AdaptionPrompt and V2 against LoRA, are tested with McNemar's exact test (llama_adapter/eval/paired.py).

    python bench/compare_methods.py [--steps 60] [--val-limit 300] [--alpaca-steps 60] [--nll-records 100]
        [--option-order shuffled|original] [--answer-form letter|choice] [--rows "V1;PEFT LoRA r8 q,v"]
        [--tables sqa,alpaca] [--experts 'precomputed:CAPTIONS.json;precomputed:OCRS.json'] [--lr-scale S]
        [--name N]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bench_threads,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    scienceqa_validation,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca"
SQA_CAPTIONS, SQA_OCRS = SHARED / "scienceqa" / "captions.json", SHARED / "scienceqa" / "ocrs.json"
GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


@dataclass
class Row:
    name: str
    impl: str  # "ours", "peft-adaption-prompt", "peft-lora", "full" (every weight trained) or "none" (zero-shot)
    method: dict[str, Any] = field(default_factory=dict)  # our method: {"name": ..., options}
    lr: float | None = None  # None: not trained (zero-shot)
    images: bool = False  # train and evaluate with the problems' images
    joint: bool = False  # V2 joint training: text steps (instruction group) and image steps (visual group)
    expert_texts: bool = False  # the --experts texts about the image in the context, without the image itself

    def uses_experts(self) -> bool:
        """Whether the --experts texts enter this row's prompts: with the image (an image reaches the model through
        its encoder and through the experts, as V2 is specified) or, for a diagnostic row, instead of it."""
        return self.images or self.expert_texts


@functools.cache
def committed_recipe(recipe: str):
    from llama_adapter.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / recipe)


def from_recipe(name: str, recipe: str, images: bool = False, joint: bool = False, **method: Any) -> Row:
    """A row of ours with the method options and learning rate of a committed CPU recipe (with
    `method` overriding options), so the comparison runs what the recipes recommend."""
    r = committed_recipe(recipe)
    return Row(name, "ours", {**r.method, **method}, lr=float(r.train.lr), images=images, joint=joint)


V2_RECIPE, LAVIN_RECIPE = "v2_smollm2_synth_alpaca_cpu.yaml", "lavin_smollm2_synth_cpu.yaml"
# Rows that both tables train, defined once so that the two tables compare the same configurations.
ZERO_SHOT = Row("zero-shot", "none")
V1 = from_recipe("V1", "v1_smollm2_alpaca_cpu.yaml")
V2_TEXT = from_recipe("V2 (no images)", V2_RECIPE, vision=None)
LAVIN_TEXT = from_recipe("LaVIN (no images)", LAVIN_RECIPE, vision=None)
PEFT_ADAPTION_PROMPT = Row("PEFT AdaptionPrompt", "peft-adaption-prompt", lr=V1.lr)  # the same method as V1
PEFT_LORA = Row("PEFT LoRA r8 q,v", "peft-lora", lr=1e-3)

SQA_ROWS = [
    ZERO_SHOT,
    V1,
    from_recipe("V1 multimodal", "v1mm_smollm2_synth_cpu.yaml", images=True),
    V2_TEXT,
    from_recipe("V2", V2_RECIPE, images=True, joint=True),
    LAVIN_TEXT,
    from_recipe("LaVIN", LAVIN_RECIPE, images=True),
    PEFT_ADAPTION_PROMPT,
    PEFT_LORA,
]
# Run only when named in --rows: V1 with PEFT's gate (one scalar per layer, no tanh), to see whether the gate
# explains a difference between V1 and PEFT's AdaptionPrompt.
V1_SCALAR_GATE = from_recipe("V1 (scalar gate)", "v1_smollm2_alpaca_cpu.yaml", gate="scalar")
# And V1 multimodal's recipe without its encoder (V1 at that recipe's learning rate), the exact text-only twin for
# the IMG comparison.
V1MM_TEXT = from_recipe("V1 multimodal (no images)", "v1mm_smollm2_synth_cpu.yaml", vision=None)
# With --experts: what the expert texts give without any visual tokens, untrained and with V2's or LaVIN's training.
ZERO_SHOT_EXPERTS = Row("zero-shot (expert texts)", "none", expert_texts=True)
EXPERT_TEXT_ROWS = [dataclasses.replace(r, name=r.name.replace("(no images)", "(expert texts, no images)"),
                                        expert_texts=True) for r in (V2_TEXT, LAVIN_TEXT)]
# And every weight of the model trained (AdamW at a usual full fine-tuning rate): what the base model can reach on
# this data and budget when nothing is frozen, a reference for the adapters' gains over zero-shot.
FULL_FINETUNE = Row("full fine-tune", "full", lr=5e-5)
DIAGNOSTIC_ROWS = [V1_SCALAR_GATE, V1MM_TEXT, ZERO_SHOT_EXPERTS, *EXPERT_TEXT_ROWS, FULL_FINETUNE]
ALPACA_ROWS = [ZERO_SHOT, V1, dataclasses.replace(V2_TEXT, name="V2"),
               dataclasses.replace(LAVIN_TEXT, name="LaVIN (text-only path)"), PEFT_ADAPTION_PROMPT, PEFT_LORA]


# -- PEFT models behind our trainer ---------------------------------------------------------------
@dataclass
class OutsideMethodConfig:
    """The config of a row that is not one of our methods (PEFT's, full fine-tuning): its kind only."""

    kind: str


class TransformersModel(torch.nn.Module):
    """A transformers causal LM that looks to our trainer and scorers like a LlamaLM without a KV cache (so
    they score it one full sequence at a time): `model(input_ids=..., output_positions=mask)` -> logits at
    those positions."""

    def __init__(self, name_or_path: str, ours_config):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.inner = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        self.config, self.name_or_path, self.adapter = ours_config, name_or_path, None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, output_positions: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        logits = self.inner(input_ids=input_ids).logits
        return logits if output_positions is None else logits[output_positions]


class PeftModel(TransformersModel):
    """The same, PEFT-wrapped, with the adapter's parameters as the trainable group."""

    def __init__(self, kind: str, ours_config, name_or_path: str):
        super().__init__(name_or_path, ours_config)
        from peft import AdaptionPromptConfig, LoraConfig, get_peft_model

        from llama_adapter.methods.registry import Attached

        cfg = (AdaptionPromptConfig(adapter_len=10, adapter_layers=28, task_type="CAUSAL_LM")
               if kind == "peft-adaption-prompt" else
               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM"))
        self.inner = get_peft_model(self.inner, cfg)
        names = [f"inner.{n}" for n, p in self.inner.named_parameters() if p.requires_grad]
        self.adapter = Attached(kind, OutsideMethodConfig(kind), groups={"peft": names})


# -- one row, in a subprocess -----------------------------------------------------------------------
def build(row: Row):
    import llama_adapter as la
    from llama_adapter.methods.registry import config_from_dict
    from llama_adapter.model.load import resolve_model_path

    torch.manual_seed(0)
    model, tok = la.load_pretrained("smollm2-135m")
    if row.impl == "ours":
        options = {k: v for k, v in row.method.items() if k != "name"}
        la.attach(model, config_from_dict(row.method["name"], options), tokenizer=tok)
    elif row.impl.startswith("peft"):
        model = PeftModel(row.impl, model.config, str(resolve_model_path("smollm2-135m", progress=False)))
    elif row.impl == "full":
        from llama_adapter.methods.registry import Attached

        every_weight = [n for n, _ in model.named_parameters()]
        model.adapter = Attached("full", OutsideMethodConfig("full"), groups={"all": every_weight})
    return model, tok


def row_header(row: Row, model) -> dict[str, Any]:
    """What every row reports first: its name, trainable parameters and learning rate (none for zero-shot)."""
    from llama_adapter.methods.registry import count_trainable

    trained = row.impl != "none"
    return {"row": row.name, "trainable_parameters": count_trainable(model) if trained else 0,
            "lr": row.lr if trained else None}


def sqa_examples(tok, problems, images: bool, kind: str, answer_form: str, experts: list):
    """The problems as training examples (plain template); the few whose prompt fills 512 tokens are left out."""
    from llama_adapter.data.multimodal import encode_conversation
    from llama_adapter.data.tokenize import PromptTooLong
    from llama_adapter.eval.scienceqa import scienceqa_conversations

    out = []
    for c in scienceqa_conversations(problems, experts=experts, answer_form=answer_form):
        try:
            out.append(encode_conversation(tok, c if images else dataclasses.replace(c, image=None), 512, "plain",
                                           kind=kind))
        except PromptTooLong:
            pass
    return out


def train_row(row: Row, model, tok, train: dict, args, out_dir: Path) -> dict[str, Any]:
    from llama_adapter.data.multimodal import collate_multimodal
    from llama_adapter.train import TrainConfig, Trainer

    reset_peak_rss()
    cfg = TrainConfig(out_dir=str(out_dir), max_steps=args.steps, batch_size=args.batch, lr=row.lr,
                      warmup_steps=max(1, args.steps // 10), precision="auto", threads=args.threads,
                      progress=False, resume=False, mix={k: 1.0 for k in train} if len(train) > 1 else {})
    trainer = Trainer(model, cfg, train, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id))
    t0 = time.perf_counter()
    result = trainer.fit()
    return {"train_seconds": round(time.perf_counter() - t0, 1), "tokens_per_s": round(result.tokens_per_second, 1),
            "final_train_loss": result.train_loss, "peak_memory_mb": round(peak_rss_bytes() / 2**20, 1)}


def run_sqa_row(row: Row, args, out_dir: Path) -> dict[str, Any]:
    from llama_adapter.eval.scienceqa import dev_protocol_train, evaluate_scienceqa, shuffle_choices

    problems, val = scienceqa_validation(args.val_limit)
    experts = row_experts(row, args)
    model, tok = build(row)
    out = row_header(row, model)
    if row.impl != "none":
        train_p = dev_protocol_train(problems)
        train_p = shuffle_choices(train_p) if args.option_order == "shuffled" else train_p
        if row.joint:
            train = {"instruction": sqa_examples(tok, train_p, False, "instruction", args.answer_form, experts),
                     "vqa": [e for e in sqa_examples(tok, train_p, True, "vqa", args.answer_form, experts)
                             if e.image is not None]}
        else:
            train = {"vqa": sqa_examples(tok, train_p, row.images, "vqa", args.answer_form, experts)}
        out.update(train_row(row, model, tok, train, args, out_dir))
    t0 = time.perf_counter()
    res = evaluate_scienceqa(model, tok, val, mode="ranked", template="plain", images=row.images,
                             experts=experts, answer_form=args.answer_form)
    out.update({"eval_seconds": round(time.perf_counter() - t0, 1), "val_problems": len(val),
                "accuracy": res.summary(), "two_choice_b": two_choice_b(val, res.predictions),
                "correct": [r["correct"] for r in res.predictions]})
    t0 = time.perf_counter()
    circ = evaluate_scienceqa(model, tok, val, mode="ranked", template="plain", images=row.images, circular=True,
                              experts=experts, answer_form=args.answer_form)
    out.update({"circular_eval_seconds": round(time.perf_counter() - t0, 1), "circular": circ.summary()})
    return out


def row_experts(row: Row, args) -> list:
    """The experts whose texts enter this row's contexts (loaded once for training and evaluation)."""
    from llama_adapter.experts import load_expert

    return [load_expert(s) for s in semicolon_list(args.experts)] if row.uses_experts() else []


def semicolon_list(text: str) -> list[str]:
    """An option's ;-separated items (--rows, --experts), stripped, empty ones dropped."""
    return [s.strip() for s in text.split(";") if s.strip()]


def two_choice_b(problems: list, predictions: list[dict]) -> dict[str, float]:
    """How often (B) is predicted and how often it is right among the two-choice validation problems: a model that
    learnt the training side's answer-position prior predicts (B) more often than it is the answer."""
    two = [r for p, r in zip(problems, predictions, strict=True) if len(p.choices) == 2]
    return {"predicted": round(sum(r["prediction"] == 1 for r in two) / len(two), 3),
            "answer": round(sum(r["answer"] == 1 for r in two) / len(two), 3)}


def run_alpaca_row(row: Row, args, out_dir: Path) -> dict[str, Any]:
    from llama_adapter.data.formats import read_alpaca
    from llama_adapter.data.instructions import encode_records
    from llama_adapter.data.sources import DataConfig
    from llama_adapter.eval.nll import held_out_alpaca, response_nll

    model, tok = build(row)
    out = row_header(row, model)
    if row.impl != "none":
        records = read_alpaca(ALPACA / "alpaca_data_1k.json")
        examples = encode_records(records, tok, DataConfig(train="-", template="alpaca", max_len=256,
                                                           on_long_prompt="skip"))
        out.update(train_row(row, model, tok, {"instruction": examples}, args, out_dir))
    held = held_out_alpaca(ALPACA / "alpaca_data_1k.json", ALPACA / "alpaca_small_2k.json", args.nll_records)
    out.update({"held_out_records": len(held), "held_out_response_nll": round(response_nll(model, tok, held), 4)})
    return out


# -- the parent: rows in subprocesses, then the table, JSON and chart ---------------------------------
def child(args) -> None:
    torch.set_num_threads(args.threads)
    rows = {"sqa": SQA_ROWS, "alpaca": ALPACA_ROWS}[args.part] + DIAGNOSTIC_ROWS
    row = next(r for r in rows if r.name == args.row)
    if row.lr is not None:  # rounded so that 3 x 3e-3 trains and reports as 0.009, not 0.009000000000000001
        row = dataclasses.replace(row, lr=round(row.lr * args.lr_scale, 12))
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_sqa_row if args.part == "sqa" else run_alpaca_row
        result = fn(row, args, Path(tmp) / "run")
    Path(args.child_out).write_text(json.dumps(result))


def run_child(part: str, row: Row, args) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--part", part, "--row", row.name, "--child-out", path,
           "--steps", str(args.steps if part == "sqa" else args.alpaca_steps), "--batch", str(args.batch),
           "--val-limit", str(args.val_limit), "--nll-records", str(args.nll_records), "--threads", str(args.threads),
           "--lr-scale", str(args.lr_scale),
           "--option-order", args.option_order, "--answer-form", args.answer_form, "--experts", args.experts]
    print(f"[{part}] {row.name} ...", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    print(f"[{part}] {row.name}: {json.dumps(result)}", flush=True)
    return result


# Pairs the targets compare, tested for a difference beyond chance when both rows ran.
TARGET_PAIRS = ((V1.name, PEFT_ADAPTION_PROMPT.name), (V2_TEXT.name, PEFT_LORA.name))


def paired_tests(sqa: list[dict]) -> list[tuple[str, str, Any]]:
    """(row a, row b, PairedComparison): McNemar's exact test of every trained row against zero-shot and of the
    target pairs, on the same problems (rows without per-problem results are skipped)."""
    from llama_adapter.eval.paired import compare_paired

    by_name = {r["row"]: r for r in sqa if "correct" in r}
    pairs = [(r, ZERO_SHOT.name) for r in by_name if r != ZERO_SHOT.name] + list(TARGET_PAIRS)
    return [(a, b, compare_paired(by_name[a]["correct"], by_name[b]["correct"]))
            for a, b in pairs if a in by_name and b in by_name]


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def cost_cells(r: dict) -> str:
    """Trainable parameters, training seconds, tokens/s and peak RSS: the columns both tables end with."""
    return " | ".join([f"{r['trainable_parameters']:,}"]
                      + [str(r.get(k, "-")) for k in ("train_seconds", "tokens_per_s", "peak_memory_mb")])


def sqa_table(sqa: list[dict], tests: list[tuple[str, str, Any]], args) -> list[str]:
    p_zero = {a: t.p_value for a, b, t in tests if b == ZERO_SHOT.name}
    head = ("| method | overall | p vs zero-shot | circular | " + " | ".join(GROUPS)
            + " | (B) chosen, 2 choices | trainable params | train s | tokens/s | peak RSS MB |")
    lines = [f"ScienceQA dev protocol, SmolLM2-135M, {args.steps} steps x batch {args.batch} per trained row, "
             f"training problems' choices {args.option_order}, answers by {args.answer_form} (ranked-choice "
             f"accuracy, %, on "
             f"{sqa[0]['val_problems']} validation problems; \"circular\": right only when every rotation of the "
             f"choices is answered right; \"(B) chosen\": how often the model picks (B) on the "
             f"two-choice ones, where it is the answer {pct(sqa[0].get('two_choice_b', {}).get('answer'))}% of the "
             f"time; \"p vs zero-shot\": McNemar's exact test on the same problems)"
             + (f"; learning rates {args.lr_scale:g}x the recipes'" if args.lr_scale != 1 else "")
             + (f"; the experts' texts ({experts_named(args.experts)}) in the context of the rows with images and of "
                f"the \"(expert texts)\" rows" if args.experts else "") + ":", "", head,
             "|" + "---|" * (len(GROUPS) + 9)]
    for r in sqa:
        acc = r["accuracy"]
        groups = acc.get("groups", {})
        b = r.get("two_choice_b") or {}
        circular = pct(r["circular"]["accuracy"]) if "circular" in r else "-"
        p = f"{p_zero[r['row']]:.2g}" if r["row"] in p_zero else "-"
        lines.append(f"| {r['row']} | {pct(acc['accuracy'])} | {p} | {circular} | "
                     + " | ".join(pct(groups.get(g)) for g in GROUPS)
                     + f" | {pct(b.get('predicted'))} | {cost_cells(r)} |")
    pair_lines = [t.format(a, b) for a, b, t in tests if b != ZERO_SHOT.name]
    return lines + ([""] + [f"- {line}" for line in pair_lines] if pair_lines else [])


def experts_named(experts: str) -> str:
    """The experts for the table's caption: file names, or the spec when it names no file."""
    return ", ".join(Path(s.partition(":")[2]).name or s for s in semicolon_list(experts))


def alpaca_table(alpaca: list[dict], args) -> list[str]:
    lines = [f"Held-out Alpaca response NLL (per token, {alpaca[0]['held_out_records']} records) after "
             f"{args.alpaca_steps} steps x batch {args.batch} on alpaca_data_1k.json:", "",
             "| method | NLL | trainable params | train s | tokens/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in alpaca:
        lines.append(f"| {r['row']} | {r['held_out_response_nll']:.4f} | {cost_cells(r)} |")
    return lines


def markdown(sqa: list[dict], tests: list[tuple[str, str, Any]], alpaca: list[dict], args) -> str:
    parts = ([sqa_table(sqa, tests, args)] if sqa else []) + ([alpaca_table(alpaca, args)] if alpaca else [])
    return "\n\n".join("\n".join(p) for p in parts)


def chart(sqa: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in sqa]
    overall = [100 * r["accuracy"]["accuracy"] for r in sqa]
    img = [100 * (r["accuracy"].get("groups", {}).get("IMG") or 0) for r in sqa]
    circular = [100 * r["circular"]["accuracy"] if "circular" in r else 0 for r in sqa]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for offset, values, label in ((-0.27, overall, "overall"), (0.0, img, "IMG"), (0.27, circular, "circular")):
        ax.bar([i + offset for i in x], values, width=0.27, label=label)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("ScienceQA dev-val accuracy, %")
    ax.set_title("SmolLM2-135M, equal steps, ranked-choice")
    ax.set_ylim(0, 1.25 * max(overall + img + circular))
    ax.legend(ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--alpaca-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--val-limit", type=int, default=300, help="validation problems, evenly spread (0: all)")
    ap.add_argument("--nll-records", type=int, default=100)
    ap.add_argument("--option-order", choices=("shuffled", "original"), default="shuffled",
                    help="training problems' choices: shuffled per pid (removes the answer-position prior) or as given")
    ap.add_argument("--answer-form", choices=("letter", "choice"), default="letter",
                    help='answers name the choice by letter ("The answer is B.", the papers\') or by its text, in '
                         "training and in ranked scoring")
    ap.add_argument("--experts", default="", metavar="SPEC;SPEC",
                    help="expert texts about each image (llama-adapter's --expert specs, separated by ;) in the "
                         "context of the rows with images, in training and evaluation; ScienceQA's: "
                         f"'precomputed:{SQA_CAPTIONS};precomputed:{SQA_OCRS}'")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiply every trained row's learning rate (its recipe's) by this, for a learning-rate sweep")
    ap.add_argument("--threads", type=int, default=bench_threads())
    ap.add_argument("--rows", default="", help="row names to run, separated by ; (default: all)")
    ap.add_argument("--name", default="compare_methods")
    ap.add_argument("--tables", default="sqa,alpaca", help="which tables: sqa, alpaca or both (comma-separated)")
    ap.add_argument("--part", choices=("sqa", "alpaca"), help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return child(args)
    wanted = set(semicolon_list(args.rows))
    t0 = time.perf_counter()
    tables = {t.strip() for t in args.tables.split(",")}
    def chosen(rows: list[Row]) -> list[Row]:  # the diagnostic rows only when named
        return [r for r in rows + DIAGNOSTIC_ROWS if r.name in wanted] if wanted else rows

    sqa = [run_child("sqa", r, args) for r in chosen(SQA_ROWS)] if "sqa" in tables else []
    alpaca = [run_child("alpaca", r, args) for r in chosen(ALPACA_ROWS)] if "alpaca" in tables else []
    tests = paired_tests(sqa)
    figures = {"scienceqa": sqa, "paired_tests": [{"a": a, "b": b, **dataclasses.asdict(t)} for a, b, t in tests],
               "alpaca": alpaca, "steps": args.steps,
               "alpaca_steps": args.alpaca_steps, "batch_size": args.batch, "val_limit": args.val_limit,
               "option_order": args.option_order, "lr_scale": args.lr_scale, "answer_form": args.answer_form,
               "experts": args.experts,
               "total_seconds": round(time.perf_counter() - t0)}
    md = markdown(sqa, tests, alpaca, args)
    write_results(args.name, figures, md, machine_info(("transformers", "peft")))
    if sqa:
        chart(sqa, Path(__file__).resolve().parent / "results" / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()

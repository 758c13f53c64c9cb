"""Ablation sweeps: one recipe, a grid of overrides, several seeds, one evaluation, one report.

Why a module of its own: the papers' claims are ablations (zero vs random init, adapted layers,
routing, joint training), and rerunning one means training and evaluating a grid of settings
the same way, pairing their results on the same problems, and surviving a kill in the middle.

Layout of the output folder:
  runs/<setting>/seed<k>/   one run: the trainer's folder (checkpoints, log.jsonl), then
                            result.json (evaluation, per-example results, parameters, time) and
                            the `done` marker, written last; a run with both is never rerun
                            (an unfinished run resumes from its own checkpoints); with `reuse`,
                            a finished identical run of another sweep is copied here instead
  results.json, results.md  one row per setting: mean and spread over seeds, parameters, time,
                            and the paired test against the recipe's own setting
  loss_curves.png           the settings' training-loss curves (mean over seeds) overlaid

Paired tests, between a setting and the recipe's own setting (the grid point whose recipe equals the
unmodified recipe), over (seed, example) pairs: the setting's run with seed s against the baseline's run
with seed s on the same examples. Accuracy evaluations (scienceqa, synth): McNemar's exact test on the
discordant pairs (eval/paired.py). NLL: the exact two-sided sign test on the per-example differences
(ties dropped), which is the same binomial test on the counts of "lower for A" and "lower for B".
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.multimodal import collate_multimodal
from .data.sources import load_source
from .data.tokenize import collate
from .eval.paired import compare_paired, mcnemar_p_value
from .fileio import atomic_write_json, atomic_write_text, read_json
from .loss import lm_loss
from .methods.registry import count_trainable
from .model.llama import LlamaLM
from .model.tokenizer import Tokenizer
from .recipe import Recipe, load_recipe
from .runner import run_recipe

EVALS = ("scienceqa", "alpaca-nll", "synth")
DONE = "done"
# train settings that differ between the runs of one setting without making it another setting
RUN_KEYS = ("seed", "out_dir", "device", "progress")


@dataclass
class EvalSpec:
    """Which evaluation scores each run, and its inputs.

    scienceqa: accuracy on the development protocol's validation side (`problems` [+ `images`]);
    alpaca-nll: held-out mean NLL per response token, on `file` (an Alpaca JSON; records whose instruction is in
    the recipe's Alpaca training file are left out) or else the recipe's own validation examples;
    synth: VQA accuracy on `file` (the synthetic set's test JSON)."""

    name: str
    problems: str | None = None
    images: str | None = None
    file: str | None = None
    limit: int | None = None
    mode: str = "ranked"  # scienceqa: "ranked" (deterministic, cheap) or "generate"
    answer_form: str = "letter"
    template: str | None = None  # default: the recipe's first data source's template
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.name not in EVALS:
            raise ValueError(f"unknown evaluation {self.name!r}; choose one of {', '.join(EVALS)}")
        if self.name == "scienceqa" and not self.problems:
            raise ValueError("the scienceqa evaluation needs the problems file (--problems)")
        if self.name == "synth" and not self.file:
            raise ValueError("the synth evaluation needs the synthetic set's test file (--eval-file)")

    @property
    def metric(self) -> str:
        return "nll" if self.name == "alpaca-nll" else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


@dataclass(frozen=True)
class RunJob:
    """One training run of the grid, with everything a worker process needs."""

    recipe: str
    overrides: tuple[str, ...]
    label: str
    seed: int
    folder: str
    evaluation: EvalSpec


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)  # run folders trained in this call (the rest were done already)
    reused: list[str] = field(default_factory=list)  # run folders copied from another sweep's identical runs


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["method.init=zero,random", ...] -> [("method.init", ["zero", "random"]), ...]."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--grid {item!r} is not of the form section.key=V1,V2,...")
        grid.append((key.strip(), vals))
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid key is given twice: {keys}")
    return grid


def settings_of(grid: Sequence[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    """The product of the grid's values, as ((key, value), ...) per setting."""
    keys = [k for k, _ in grid]
    return [tuple(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in grid))]


def label_of(setting: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting) or "recipe"


def _slug(setting: Sequence[tuple[str, str]]) -> str:
    text = "__".join(f"{k}={v}" for k, v in setting) or "recipe"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def _identity(recipe: Recipe) -> dict[str, Any]:
    """What makes two recipes the same setting: everything but the per-run train keys, with the method's
    defaults filled in (so `method.init=zero` equals a recipe that does not name init)."""
    train = {k: v for k, v in dataclasses.asdict(recipe.train).items() if k not in RUN_KEYS}
    return {"model": recipe.model, "method": dataclasses.asdict(recipe.method_config()),
            "data": [dataclasses.asdict(d) for d in recipe.data], "train": train}


def plan(recipe: str, grid: Sequence[tuple[str, list[str]]], seeds: int, out: Path, evaluation: EvalSpec,
         overrides: Sequence[str] = ()) -> tuple[list[RunJob], str | None]:
    """(every run of the grid, the label of the recipe's own setting or None when the grid lacks it).
    Each setting is loaded once here, so a bad key or value is refused before anything trains."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    base = _identity(load_recipe(recipe, list(overrides)))
    jobs, baseline = [], None
    for setting in settings_of(grid):
        label = label_of(setting)
        setting_overrides = [*overrides, *(f"{k}={v}" for k, v in setting)]
        if _identity(load_recipe(recipe, setting_overrides)) == base and baseline is None:
            baseline = label
        for seed in range(seeds):
            folder = out / "runs" / _slug(setting) / f"seed{seed}"
            run_overrides = (*setting_overrides, f"train.seed={seed}", f"train.out_dir={folder}",
                             "train.progress=false")
            jobs.append(RunJob(str(recipe), run_overrides, label, seed, str(folder), evaluation))
    return jobs, baseline


def is_done(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file() and (Path(folder) / "result.json").is_file()


def _run_key(recipe: Recipe) -> tuple[str, int]:
    """What makes two runs the same run: the setting's identity and the seed."""
    return json.dumps(_identity(recipe), sort_keys=True, default=str), recipe.train.seed


def reuse_runs(jobs: Sequence[RunJob], evaluation: EvalSpec, donors: Sequence[str | Path]) -> list[str]:
    """Copy into this sweep the finished runs of other sweeps that are the same run: the same recipe (less
    the per-run keys), the same seed and the same evaluation. Why: ablations of one recipe share its own
    setting, so sweeps of different keys need not train the baseline again. Returns the folders filled."""
    wanted = {_run_key(load_recipe(j.recipe, list(j.overrides))): j for j in jobs if not is_done(j.folder)}
    filled = []
    for donor in map(Path, donors):
        sweep_file = donor / "sweep.json"
        if not sweep_file.is_file():
            raise FileNotFoundError(f"--reuse {donor}: not a sweep folder (no sweep.json)")
        if read_json(sweep_file, "sweep settings").get("eval") != dataclasses.asdict(evaluation):
            print(f"--reuse {donor}: evaluated differently, none of its runs taken")
            continue
        for folder in sorted((donor / "runs").glob("*/seed*")):
            if not wanted or not is_done(folder) or not (folder / "recipe.yaml").is_file():
                continue
            job = wanted.pop(_run_key(load_recipe(folder / "recipe.yaml")), None)
            if job is not None:
                _copy_run(folder, job)
                filled.append(job.folder)
    return filled


def _copy_run(source: Path, job: RunJob) -> None:
    """The finished run at `source` as `job`'s folder (written beside it, then renamed into place)."""
    import shutil

    target, staging = Path(job.folder), Path(job.folder + ".reusing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    result = read_json(staging / "result.json", "sweep run result")
    atomic_write_json(staging / "result.json", {**result, "setting": job.label, "reused_from": str(source)})
    shutil.rmtree(target, ignore_errors=True)  # an unfinished attempt at the same run
    staging.rename(target)


# -- evaluation of one trained run ------------------------------------------------------------------

def _template(spec: EvalSpec, recipe: Recipe, tok: Tokenizer) -> str:
    if spec.template:
        return spec.template
    if recipe.data and recipe.data[0].format != "alpaca":
        return recipe.data[0].template
    return "chat" if tok.has_chat_template else "plain"


@torch.no_grad()
def _per_example_nll(model: LlamaLM, tok: Tokenizer, spec: EvalSpec, recipe: Recipe) -> dict[str, Any]:
    if spec.file:
        from .data.formats import read_alpaca
        from .data.instructions import encode_records
        from .data.sources import DataConfig
        from .eval.nll import held_out_alpaca

        alpaca = next((d for d in recipe.data if d.format == "alpaca"), None)
        # held out: the file's records whose instruction the recipe's Alpaca training file does not hold
        records = held_out_alpaca(alpaca.train, spec.file) if alpaca is not None else read_alpaca(spec.file)
        source = DataConfig(train=spec.file, format="alpaca", template=alpaca.template if alpaca else "alpaca",
                            max_len=alpaca.max_len if alpaca else 512, on_long_prompt="skip")
        examples, collate_fn = encode_records(records, tok, source), None
    else:
        examples = [ex for source in recipe.data for ex in load_source(source, tok)[1]]
        multimodal = any(source.format != "alpaca" for source in recipe.data)
        collate_fn = (lambda ex: collate_multimodal(ex, tok.pad_id)) if multimodal else None
        if not examples:
            raise ValueError("alpaca-nll: the recipe has no validation examples (set data.val or data.val_size), "
                             "and no --eval-file was given")
    examples = examples[: spec.limit] if spec.limit else examples
    model.eval()
    per: dict[str, float] = {}
    total, tokens = 0.0, 0
    for i, ex in enumerate(examples):
        batch = (collate_fn([ex]) if collate_fn else collate([ex], tok.pad_id)).to(model.device)
        loss = float(lm_loss(model, batch))
        n = batch.n_label_tokens
        if n:
            per[str(i)] = loss / n
            total, tokens = total + loss, tokens + n
    return {"value": total / max(tokens, 1), "examples": per, "n": len(per)}


def evaluate_run(model: LlamaLM, tok: Tokenizer, spec: EvalSpec, recipe: Recipe) -> dict[str, Any]:
    """{"value": the metric, "examples": {example id: correct or NLL}, "n": count}."""
    if spec.name == "alpaca-nll":
        return _per_example_nll(model, tok, spec, recipe)
    if spec.name == "scienceqa":
        from .eval.scienceqa import evaluate_scienceqa
        from .eval.selection import select_scienceqa

        problems = select_scienceqa(spec.problems or "", spec.images, protocol="dev-val", limit=spec.limit)
        result = evaluate_scienceqa(model, tok, problems, mode=spec.mode, template=_template(spec, recipe, tok),
                                    batch_size=spec.batch_size, answer_form=spec.answer_form)
        return {"value": result.accuracy, "examples": {str(r["pid"]): bool(r["correct"]) for r in result.predictions},
                "n": result.n}
    from .eval.vqa import evaluate_vqa

    vqa = evaluate_vqa(model, tok, spec.file or "", template=_template(spec, recipe, tok), limit=spec.limit,
                       batch_size=spec.batch_size)
    return {"value": vqa.accuracy, "examples": {str(i): bool(p["correct"]) for i, p in enumerate(vqa.predictions)},
            "n": len(vqa.predictions)}


def run_job(job: RunJob, device: str | None = None) -> str:
    """Train and evaluate one run (resuming its own checkpoints), then write result.json and the done marker."""
    overrides = [*job.overrides, *([f"train.device={device}"] if device else [])]
    recipe = load_recipe(job.recipe, overrides)
    result, model, tok = run_recipe(recipe)
    evaluation = evaluate_run(model, tok, job.evaluation, recipe)
    folder = Path(job.folder)
    atomic_write_json(folder / "result.json", {
        "setting": job.label, "seed": job.seed, "metric": job.evaluation.metric, "eval": job.evaluation.name,
        "value": evaluation["value"], "n": evaluation["n"], "examples": evaluation["examples"],
        "trainable_parameters": count_trainable(model), "train_seconds": result.seconds, "steps": result.steps,
        "final_train_loss": result.train_loss, "val_loss": result.val_loss, "device": str(model.device)})
    atomic_write_text(folder / DONE, "")
    return job.folder


# -- running the grid -------------------------------------------------------------------------------

_WORKER_DEVICE: str | None = None


def _take_device(queue: Any) -> None:
    """Pool initializer: each worker process keeps one device for all its runs (one run a device)."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()


def _run_on_worker_device(job: RunJob) -> str:
    return run_job(job, _WORKER_DEVICE)


def _run_all(jobs: list[RunJob], devices: Sequence[str], bar: Any,
             runner: Callable[[RunJob, str | None], str]) -> list[str]:
    if len(devices) <= 1:
        ran = []
        for job in jobs:
            ran.append(runner(job, devices[0] if devices else None))
            bar.update(1)
        return ran
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    ran = []
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx, initializer=_take_device,
                             initargs=(queue,)) as pool:
        pending: set[Future[str]] = {pool.submit(_run_on_worker_device, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    ran.append(fut.result())
                    bar.update(1)
        except BaseException:  # a failed run (or Ctrl-C): start no further runs; finished ones stay done
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return ran


def run_sweep(recipe: str, grid: Sequence[tuple[str, list[str]]], evaluation: EvalSpec, out: str | Path,
              seeds: int = 3, devices: Sequence[str] = (), overrides: Sequence[str] = (),
              runner: Callable[[RunJob, str | None], str] = run_job, reuse: Sequence[str | Path] = ()) -> SweepResult:
    """Run every (setting, seed) of the grid not already done, then write the table and the plot.
    `reuse`: other sweeps' folders whose identical finished runs are copied instead of trained again.
    `runner` is the one-run function (a test may wrap it; with several devices the pool runs `run_job`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    jobs, baseline = plan(recipe, grid, seeds, out, evaluation, overrides)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {"recipe": str(recipe), "grid": [[k, v] for k, v in grid], "seeds": seeds,
                                           "overrides": list(overrides), "eval": dataclasses.asdict(evaluation),
                                           "baseline": baseline, "reuse": [str(d) for d in reuse]})
    reused = reuse_runs(jobs, evaluation, reuse) if reuse else []
    todo = [j for j in jobs if not is_done(j.folder)]
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep runs", unit="run") as bar:
        ran = _run_all(todo, devices, bar, runner)
    rows = summarise(jobs, baseline, evaluation)
    write_report(out, rows, evaluation, baseline, jobs)
    return SweepResult(out, rows, ran, reused)


# -- the report ---------------------------------------------------------------------------------------

def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def paired_test(spec: EvalSpec, runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The setting against the baseline over (seed, example) pairs present in both."""
    a, b = [], []
    for seed in sorted(runs.keys() & base.keys()):
        ea, eb = runs[seed]["examples"], base[seed]["examples"]
        for key in sorted(ea.keys() & eb.keys()):
            a.append(ea[key])
            b.append(eb[key])
    if spec.metric == "accuracy":
        c = compare_paired(a, b)
        return {"test": "McNemar exact", "pairs": c.n, "better": c.a_only, "worse": c.b_only, "p_value": c.p_value}
    lower = sum(x < y for x, y in zip(a, b))
    higher = sum(x > y for x, y in zip(a, b))
    return {"test": "sign test (exact)", "pairs": len(a), "better": lower, "worse": higher,
            "p_value": mcnemar_p_value(lower, higher)}


def summarise(jobs: list[RunJob], baseline: str | None, spec: EvalSpec) -> list[dict[str, Any]]:
    """One row per setting (in grid order) from the finished runs' result.json files."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for job in jobs:
        results.setdefault(job.label, {})
        if is_done(job.folder):
            results[job.label][job.seed] = read_json(Path(job.folder) / "result.json", "sweep run result")
    rows = []
    for label, runs in results.items():
        values = [r["value"] for r in runs.values()]
        row: dict[str, Any] = {
            "setting": label, "baseline": label == baseline, "runs": len(runs), "seeds": sorted(runs),
            spec.metric: statistics.fmean(values) if values else None, "spread": _spread(values),
            "per_seed": {str(s): r["value"] for s, r in sorted(runs.items())},
            "trainable_parameters": next((r["trainable_parameters"] for r in runs.values()), None),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs.values()) if runs else None}
        if baseline is not None and label != baseline and runs and results.get(baseline):
            row["paired"] = paired_test(spec, runs, results[baseline])
        rows.append(row)
    return rows


def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], spec: EvalSpec, baseline: str | None) -> str:
    acc = spec.metric == "accuracy"
    head = (f"| setting | runs | {'accuracy (%)' if acc else 'NLL (nats/token)'} mean ± sd | per seed | "
            f"trainable | train s (mean) | vs recipe's own: better/worse, p |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        scale, digits = (100.0, 2) if acc else (1.0, 4)
        mean = f"{_fmt(r[spec.metric], scale, digits)} ± {_fmt(r['spread'], scale, digits)}"
        seeds = " ".join(_fmt(v, scale, digits) for v in r["per_seed"].values())
        if r["baseline"]:
            vs = "(the recipe's own setting)"
        elif "paired" in r:
            p = r["paired"]
            vs = f"{p['better']}/{p['worse']} of {p['pairs']}, p = {p['p_value']:.3g}"
        else:
            vs = "n/a"
        params = "n/a" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}"
        lines.append(f"| {r['setting']} | {r['runs']} | {mean} | {seeds} | {params} | {_fmt(r['train_seconds'], 1, 1)} "
                     f"| {vs} |")
    test = ("McNemar's exact test" if acc else "the exact sign test on per-example NLL (ties dropped)")
    note = (f"Paired over (seed, example): {test}; 'better/worse' counts the pairs where the setting beats / loses "
            f"to the recipe's own setting ({'right only for one' if acc else 'lower / higher NLL'}).")
    if baseline is None:
        note += " The recipe's own setting is not in the grid, so no paired test was made."
    return "\n".join([f"Evaluation: {spec.name} ({spec.metric}).", "", *lines, "", note, ""])


def _mean_curves(jobs: list[RunJob]) -> dict[str, tuple[list[int], list[float]]]:
    """label -> (steps, train loss averaged over the seeds that logged that step)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for job in jobs:
        log = Path(job.folder) / "log.jsonl"
        if not is_done(job.folder) or not log.is_file():
            continue
        by_step = sums.setdefault(job.label, {})
        for line in log.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if "loss" in rec and "step" in rec:
                by_step.setdefault(int(rec["step"]), []).append(float(rec["loss"]))
    return {label: (sorted(s), [statistics.fmean(s[k]) for k in sorted(s)]) for label, s in sums.items() if s}


def plot_curves(jobs: list[RunJob], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (steps, losses) in _mean_curves(jobs).items():
        ax.plot(steps, losses, linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token), mean over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, rows: list[dict[str, Any]], spec: EvalSpec, baseline: str | None,
                 jobs: list[RunJob]) -> None:
    atomic_write_json(out / "results.json", {"eval": spec.name, "metric": spec.metric, "baseline": baseline,
                                             "rows": rows})
    atomic_write_text(out / "results.md", markdown_table(rows, spec, baseline))
    plot_curves(jobs, out / "loss_curves.png", title=f"sweep: {spec.name}")

"""`llama-adapter sweep`: a 2x2 grid with 2 seeds on a tiny model, resume, table, paired tests, plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llama_adapter.cli import main as cli_main
from llama_adapter.sweep import EvalSpec, RunJob, paired_test, parse_grid, run_job, run_sweep, settings_of

GRID = ["method.init=zero,random", "method.prompt=linear,mlp"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    from conftest import save_tiny_folder

    root = tmp_path_factory.mktemp("sweep")
    folder = save_tiny_folder(root / "tiny")
    words = ["red", "blue", "green", "one", "two", "three", "yes", "no"]
    records = [{"instruction": f"say {w}", "input": "", "output": f"the answer is {w}"} for w in words]
    data = root / "alpaca.json"
    data.write_text(json.dumps(records + records[:4]))
    tree = {"model": str(folder),
            "method": {"name": "adapter_v1", "prompt_len": 2, "n_layers": 2, "prompt_hidden": 8},
            "data": {"train": str(data), "format": "alpaca", "max_len": 96, "val_size": 4},
            "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-2, "warmup_steps": 0, "threads": 1}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_grid_parsing_and_refusals():
    grid = parse_grid(GRID)
    assert grid == [("method.init", ["zero", "random"]), ("method.prompt", ["linear", "mlp"])]
    assert len(settings_of(grid)) == 4
    for bad in ["method.init", "method.init=", "=a,b"]:
        with pytest.raises(ValueError, match="section.key=V1"):
            parse_grid([bad])
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["a.b=1", "a.b=2"])
    with pytest.raises(ValueError, match="problems"):
        EvalSpec("scienceqa")
    with pytest.raises(ValueError, match="unknown evaluation"):
        EvalSpec("bleu")


def test_paired_tests_count_pairs_by_seed_and_example():
    acc = EvalSpec("synth", file="x.json")
    a = {0: {"examples": {"1": True, "2": True, "3": False}}, 1: {"examples": {"1": True, "2": False, "3": False}}}
    b = {0: {"examples": {"1": False, "2": True, "3": False}}, 1: {"examples": {"1": False, "2": False, "3": True}},
         2: {"examples": {"1": True}}}  # seed 2 has no partner: left out
    t = paired_test(acc, a, b)
    assert (t["test"], t["pairs"], t["better"], t["worse"]) == ("McNemar exact", 6, 2, 1)
    assert t["p_value"] == pytest.approx(1.0)
    nll = EvalSpec("alpaca-nll")
    lower = {0: {"examples": {str(i): 1.0 for i in range(8)}}}
    higher = {0: {"examples": {str(i): 2.0 for i in range(8)}}}
    t = paired_test(nll, lower, higher)
    assert (t["better"], t["worse"]) == (8, 0) and t["p_value"] == pytest.approx(2 / 2**8)


def test_unknown_grid_key_is_refused_before_training(recipe, tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        run_sweep(str(recipe), parse_grid(["method.inti=zero,random"]), EvalSpec("alpaca-nll"), tmp_path / "s",
                  seeds=1)
    assert not (tmp_path / "s" / "runs").exists()


def test_sweep_runs_resumes_and_reports(recipe, tmp_path, capsys):
    out = tmp_path / "sweep"
    spec = EvalSpec("alpaca-nll")
    grid = parse_grid(GRID)
    calls: list[str] = []

    class Killed(Exception):
        pass

    def killed_after_three(job: RunJob, device: str | None) -> str:
        if len(calls) == 3:
            raise Killed  # the sweep dies between runs 3 and 4
        calls.append(job.folder)
        return run_job(job, device)

    with pytest.raises(Killed):
        run_sweep(str(recipe), grid, spec, out, seeds=2, runner=killed_after_three)
    first = list(calls)
    assert len(first) == 3 and all((Path(f) / "done").is_file() for f in first)

    def counted(job: RunJob, device: str | None) -> str:
        calls.append(job.folder)
        return run_job(job, device)

    calls.clear()
    result = run_sweep(str(recipe), grid, spec, out, seeds=2, runner=counted)
    assert len(result.ran) == 5 and not set(result.ran) & set(first)  # only the five not yet done
    done = sorted(str(p.parent) for p in (out / "runs").rglob("done"))
    assert len(done) == 8

    (Path(done[2]) / "done").unlink()  # one run lost its marker: only it runs again
    calls.clear()
    result = run_sweep(str(recipe), grid, spec, out, seeds=2, runner=counted)
    assert result.ran == [done[2]] == calls

    table = json.loads((out / "results.json").read_text())
    rows = {r["setting"]: r for r in table["rows"]}
    base = "method.init=zero, method.prompt=linear"
    assert table["baseline"] == base and rows[base]["baseline"] and len(rows) == 4
    for label, row in rows.items():
        assert row["runs"] == 2 and row["seeds"] == [0, 1] and row["spread"] is not None
        assert row["nll"] > 0 and row["train_seconds"] > 0
        if label != base:
            p = row["paired"]
            assert p["test"] == "sign test (exact)" and p["pairs"] == 2 * 4 and 0 < p["p_value"] <= 1
    linear = rows[base]["trainable_parameters"]
    assert rows["method.init=zero, method.prompt=mlp"]["trainable_parameters"] > linear
    assert rows["method.init=random, method.prompt=linear"]["trainable_parameters"] == linear
    # random init changes the runs: different curves and results from zero init with the same seed
    assert rows["method.init=random, method.prompt=linear"]["nll"] != rows[base]["nll"]
    md = (out / "results.md").read_text()
    assert all(label in md for label in rows) and "sign test" in md
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the command line on the finished folder: nothing reruns, the table is printed
    assert cli_main(["sweep", "--recipe", str(recipe), "--grid", GRID[0], "--grid", GRID[1], "--seeds", "2",
                     "--eval", "alpaca-nll", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 run(s) trained now" in printed and base in printed


def test_reuse_copies_only_the_same_runs_of_another_sweep(recipe, tmp_path, capsys):
    spec = EvalSpec("alpaca-nll")
    init = run_sweep(str(recipe), parse_grid(["method.init=zero,random"]), spec, tmp_path / "init", seeds=1)
    calls: list[str] = []

    def counted(job: RunJob, device: str | None) -> str:
        calls.append(job.label)
        return run_job(job, device)

    # the prompt sweep's own setting (linear) is the init sweep's zero-init run: copied, not trained again
    result = run_sweep(str(recipe), parse_grid(["method.prompt=linear,mlp"]), spec, tmp_path / "prompt", seeds=1,
                       runner=counted, reuse=[tmp_path / "init"])
    assert calls == ["method.prompt=mlp"] and len(result.reused) == 1
    copied = json.loads((Path(result.reused[0]) / "result.json").read_text())
    donor = json.loads((tmp_path / "init" / "runs" / "method.init=zero" / "seed0" / "result.json").read_text())
    assert copied["setting"] == "method.prompt=linear" and copied["reused_from"].endswith("method.init=zero/seed0")
    assert copied["value"] == donor["value"] and copied["examples"] == donor["examples"]
    rows = {r["setting"]: r for r in result.rows}
    assert rows["method.prompt=linear"]["baseline"] and "paired" in rows["method.prompt=mlp"]
    assert init.ran and len(init.ran) == 2

    # another seed, another recipe or another evaluation is not the same run: trained
    calls.clear()
    seeds = run_sweep(str(recipe), parse_grid(["method.prompt=linear"]), spec, tmp_path / "seeds", seeds=2,
                      runner=counted, reuse=[tmp_path / "init"])
    assert calls == ["method.prompt=linear"] and [Path(f).name for f in seeds.reused] == ["seed0"]
    calls.clear()
    lr = run_sweep(str(recipe), parse_grid(["method.prompt=linear"]), spec, tmp_path / "lr", seeds=1,
                   runner=counted, reuse=[tmp_path / "init"], overrides=["train.lr=0.01"])
    assert calls == ["method.prompt=linear"] and lr.reused == []
    calls.clear()
    other = EvalSpec("alpaca-nll", limit=2)
    result = run_sweep(str(recipe), parse_grid(["method.prompt=linear"]), other, tmp_path / "limit", seeds=1,
                       runner=counted, reuse=[tmp_path / "init"])
    assert calls == ["method.prompt=linear"] and result.reused == []
    assert "evaluated differently" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no sweep.json"):
        run_sweep(str(recipe), parse_grid(["method.prompt=linear"]), spec, tmp_path / "x", seeds=1,
                  reuse=[tmp_path / "nowhere"])
    # on the command line
    assert cli_main(["sweep", "--recipe", str(recipe), "--grid", "method.prompt=linear", "--seeds", "1",
                     "--eval", "alpaca-nll", "--out", str(tmp_path / "cli"), "--reuse", str(tmp_path / "init")]) == 0
    assert "0 run(s) trained now, 1 reused from other sweeps" in capsys.readouterr().out


@pytest.mark.slow
def test_runs_are_spread_over_the_devices_given(recipe, tmp_path):
    result = run_sweep(str(recipe), parse_grid(["method.init=zero,random"]), EvalSpec("alpaca-nll"), tmp_path / "s",
                       seeds=1, devices=["cpu", "cpu"])
    assert len(result.ran) == 2
    for folder in result.ran:
        assert json.loads((Path(folder) / "result.json").read_text())["device"] == "cpu"


def test_scienceqa_sweep_pairs_runs_on_the_same_problems_with_mcnemar(recipe, tmp_path):
    """The evaluation the real ablations use: the dev protocol's validation problems, ranked, McNemar."""
    from test_scienceqa import shared_layout

    problems, images = shared_layout(tmp_path / "sqa")
    train = tmp_path / "train.json"
    assert cli_main(["data", "scienceqa", "--problems", str(problems), "--images", str(images), "--protocol",
                     "dev-train", "--answer-form", "choice", "--out", str(train)]) == 0
    overrides = [f"data.train={train}", "data.format=llava", "data.template=plain", f"data.image_root={images}",
                 "data.val_size=0", "data.max_len=200"]
    spec = EvalSpec("scienceqa", problems=str(problems), images=str(images), answer_form="choice")
    result = run_sweep(str(recipe), parse_grid(["method.init=zero,random"]), spec, tmp_path / "s", seeds=1,
                       overrides=overrides)
    rows = {r["setting"]: r for r in result.rows}
    assert rows["method.init=zero"]["baseline"] and 0 <= rows["method.init=zero"]["accuracy"] <= 1
    paired = rows["method.init=random"]["paired"]
    assert paired["test"] == "McNemar exact" and paired["pairs"] == 3  # dev pids 6, 10, 14 (pid % 4 == 2)
    saved = json.loads((Path(result.ran[0]) / "result.json").read_text())
    assert sorted(saved["examples"]) == ["10", "14", "6"] and saved["eval"] == "scienceqa"


def test_alpaca_nll_on_a_file_leaves_out_the_training_instructions(recipe, tmp_path):
    train = json.loads(Path(yaml.safe_load(recipe.read_text())["data"]["train"]).read_text())
    pool = tmp_path / "pool.json"
    fresh = [{"instruction": f"count to {n}", "input": "", "output": f"the answer is {n}"} for n in ("one", "two")]
    pool.write_text(json.dumps(train[:3] + fresh))
    result = run_sweep(str(recipe), parse_grid(["method.init=zero"]), EvalSpec("alpaca-nll", file=str(pool)),
                       tmp_path / "s", seeds=1)
    saved = json.loads((Path(result.ran[0]) / "result.json").read_text())
    assert saved["n"] == 2 and saved["value"] > 0


def docs_commands() -> list[list[str]]:
    import shlex

    text = (Path(__file__).resolve().parents[1] / "docs" / "ablations.md").read_text()
    joined = text.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[1:] for line in joined.splitlines()
            if line.startswith("llama-adapter sweep --recipe recipes/")]


def test_the_documented_sweeps_are_valid_grids():
    """Every sweep command of docs/ablations.md parses, and each of its settings is a valid recipe whose grid
    holds the recipe's own setting (so each row gets its paired test); nothing is trained or read."""
    from llama_adapter.cli import build_parser
    from llama_adapter.sweep import plan

    commands = docs_commands()
    assert len(commands) == 5
    root = Path(__file__).resolve().parents[1]
    for argv in commands:
        a = build_parser().parse_args(argv)
        spec = EvalSpec(a.eval, problems=a.problems, images=a.images, file=a.eval_file, limit=a.eval_limit)
        jobs, baseline = plan(str(root / a.recipe), parse_grid(a.grid), a.seeds, Path("unused"), spec, a.overrides)
        assert baseline is not None and len(jobs) == a.seeds * len(settings_of(parse_grid(a.grid))), argv

"""The README's commands run as written.

The rule (also stated in the README's Development section):

- Every command of a fenced ```bash block in README.md and docs/*.md must parse: `llama-adapter ...` (also
  after `torchrun ... -m llama_adapter.cli`) through the real argument parser, so its subcommand, flags and
  choices exist; a `--recipe` must load with the command's `section.key=value` overrides; `python bench/X.py`
  must name an existing script that defines every flag given; `make T` a target of the Makefile. Any
  argument naming a repository path (recipes/, bench/, docs/, src/, tests/) must exist.
- The commands of the README's section "A 5-minute tour" run in order in a scratch folder (they chain through
  runs/), in-process, capped to stay fast: a fine-tune at 2 steps of batch 1 (with one validation batch),
  `--max-new-tokens` at 8 (added to generate/chat when absent), `--limit` at 4. Under `-m slow` they also run
  uncapped through bash, exactly as written, and the section "Images" runs through bash, capped.
- The README's ```python block runs.

Commands that read `../shared/data` are skipped when that folder is missing (a clone outside this project).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
README = ROOT / "README.md"
REPO_DIRS = ("recipes/", "bench/", "docs/", "src/", "tests/")
SHELL_BUILTINS = {"source", "export", "cd", "pip", "git", "curl"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.M)


@dataclass
class Command:
    text: str  # the command as written (continuation lines joined)
    argv: list[str]  # shell words, comments removed
    where: str  # file:line, for messages
    section: str  # the "## " heading above it


def fenced_blocks(path: Path) -> list[tuple[str, str, int, str]]:
    """(language, body, line number, section) of every fenced block in a markdown file."""
    text = path.read_text()
    headings = [(m.start(), m.group(2).strip()) for m in HEADING.finditer(text) if len(m.group(1)) == 2]
    blocks = []
    for m in FENCE.finditer(text):
        section = next((h for pos, h in reversed(headings) if pos < m.start()), "")
        blocks.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2, section))
    return blocks


def shell_commands(path: Path) -> list[Command]:
    out = []
    for lang, body, line0, section in fenced_blocks(path):
        if lang not in ("bash", "sh", "shell"):
            continue
        pending, start = "", line0
        for i, line in enumerate(body.splitlines()):
            if not pending:
                start = line0 + i
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            argv = shlex.split(pending, comments=True)
            if argv:
                out.append(Command(pending.strip(), argv, f"{path.relative_to(ROOT)}:{start}", section))
            pending = ""
    return out


def documented_commands() -> list[Command]:
    paths = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return [c for p in paths if p.is_file() for c in shell_commands(p)]


def section_commands(section: str) -> list[Command]:
    return [c for c in shell_commands(README) if c.section == section]


# ---------------------------------------------------------------- parsing


OUTPUT_FLAGS = ("--out", "--out-dir")  # what follows is written by the command, so it need not exist yet


def repo_path_args(argv: list[str]) -> list[str]:
    """The repository paths a command reads (not those it writes with --out or train.out_dir=)."""
    inputs = [a for i, a in enumerate(argv) if not (i and argv[i - 1] in OUTPUT_FLAGS)
              and not a.startswith(("train.out_dir=", "--out="))]
    values = [a.split("=", 1)[1] if "=" in a and not a.startswith("-") else a for a in inputs]
    return [v for v in values if v.startswith(REPO_DIRS)]


def check_llama_adapter(argv: list[str], where: str) -> None:
    from llama_adapter.cli import build_parser
    from llama_adapter.recipe import load_recipe

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return
        raise AssertionError(f"{where}: `llama-adapter {shlex.join(argv)}` does not parse: {err.getvalue()}") from e
    if args.command in ("finetune", "params") and args.recipe:
        try:
            load_recipe(ROOT / args.recipe, args.overrides)
        except (ValueError, FileNotFoundError) as e:
            raise AssertionError(f"{where}: the recipe and overrides do not load: {e}") from e


def check_command(c: Command) -> None:
    prog, rest = c.argv[0], c.argv[1:]
    for p in repo_path_args(rest):
        assert (ROOT / p).exists(), f"{c.where}: {p} does not exist in the repository"
    if prog == "llama-adapter":
        check_llama_adapter(rest, c.where)
    elif prog == "torchrun":
        assert "-m" in rest and rest[rest.index("-m") + 1] == "llama_adapter.cli", f"{c.where}: torchrun what?"
        check_llama_adapter(rest[rest.index("-m") + 2:], c.where)
    elif prog in ("python", "python3"):
        script = ROOT / rest[0]
        assert rest[0].startswith("bench/") and script.is_file(), f"{c.where}: no script {rest[0]}"
        source = script.read_text()
        for flag in (a.split("=", 1)[0] for a in rest[1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{c.where}: {rest[0]} has no flag {flag}"
    elif prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in rest:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{c.where}: no make target {target}"
    else:
        assert prog in SHELL_BUILTINS, f"{c.where}: test_readme.py has no rule for commands of `{prog}`"


def test_the_docs_show_commands():
    commands = documented_commands()
    assert len(commands) >= 10
    assert section_commands("A 5-minute tour"), "the README lost its tour section"


@pytest.mark.parametrize("c", documented_commands(), ids=lambda c: c.where)
def test_every_documented_command_parses(c: Command):
    check_command(c)


def test_a_wrong_flag_is_caught():
    bad = Command("llama-adapter generate --max-tokens 5", ["llama-adapter", "generate", "--max-tokens", "5"],
                  "here:1", "")
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(bad)
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(Command("", ["llama-adapter", "params", "--recipe", "recipes/nope.yaml"], "here:2", ""))
    with pytest.raises(AssertionError, match="do not load"):
        check_command(Command("", ["llama-adapter", "params", "--recipe", "recipes/v1_llama7b_alpaca.yaml",
                                   "train.max_stepz=2"], "here:3", ""))


def python_blocks() -> list[tuple[str, str]]:
    paths = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return [(f"{p.name}:{line}", body) for p in paths if p.is_file()
            for lang, body, line, _ in fenced_blocks(p) if lang == "python"]


@pytest.mark.parametrize("where,body", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_blocks_compile_and_name_public_api(where: str, body: str):
    import llama_adapter as la

    compile(body, where, "exec")
    missing = sorted({n for n in re.findall(r"\bla\.(\w+)", body) if not hasattr(la, n)})
    assert not missing, f"{where}: llama_adapter has no {missing}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    out = set()
    for m in HEADING.finditer(path.read_text()):
        slug = re.sub(r"[^\w\- ]", "", m.group(2).strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").glob("*.md"))]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: link to {target}: no such heading"


# ---------------------------------------------------------------- running


def capped(argv: list[str]) -> list[str]:
    """The command with the test's cost caps (see the module docstring)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("train.max_steps="):
            out += ["train.max_steps=2", "train.batch_size=1", "train.eval_batches=1"]
        elif a in ("--max-new-tokens", "--limit") and i + 1 < len(argv):
            out += [a, str(min(int(argv[i + 1]), 8 if a == "--max-new-tokens" else 4))]
            i += 1
        else:
            out.append(a)
        i += 1
    if argv[1] in ("generate", "chat") and "--max-new-tokens" not in argv:
        out += ["--max-new-tokens", "8"]
    if argv[1] == "finetune" and not any(a.startswith("train.max_steps=") for a in argv):
        out += ["train.max_steps=2", "train.batch_size=1", "train.eval_batches=1"]
    return out


def scratch_repo(base: Path) -> Path:
    """A folder that looks like the repository root to the commands: recipes/ and ../shared."""
    repo = base / "repo"
    repo.mkdir()
    (repo / "recipes").symlink_to(ROOT / "recipes")
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED)
    return repo


def needs_missing_shared(c: Command) -> bool:
    """The command reads ../shared/data (on its command line, or in the recipe it names) and this clone has none."""
    if SHARED.is_dir():
        return False
    recipe = c.argv[c.argv.index("--recipe") + 1] if "--recipe" in c.argv[:-1] else None
    recipe_text = (ROOT / recipe).read_text() if recipe and (ROOT / recipe).is_file() else ""
    return "../shared/" in c.text or "../shared/" in recipe_text


def run_in_process(argv: list[str], monkeypatch) -> str:
    from llama_adapter.cli import main

    if argv[1] == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n\n"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv[1:])
    assert rc == 0, f"`{shlex.join(argv)}` exited with {rc}"
    return out.getvalue()


def test_the_tour_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(scratch_repo(tmp_path))
    for c in section_commands("A 5-minute tour"):
        if needs_missing_shared(c):
            pytest.skip(f"{c.where} reads ../shared/data, which this clone does not have")
        argv = capped(c.argv)
        printed = run_in_process(argv, monkeypatch)
        assert printed.strip(), f"{c.where}: `{shlex.join(argv)}` printed nothing"
        if argv[1] == "finetune":
            assert "done: 2 steps" in printed
        if argv[1] == "eval" and argv[2] == "scienceqa":
            assert "4 problems, accuracy" in printed
        if argv[1] == "export":
            out = Path(argv[argv.index("--out") + 1])
            assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def run_with_bash(commands: list[Command], cwd: Path, cap: bool) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for c in commands:
        if needs_missing_shared(c):
            pytest.skip(f"{c.where} reads ../shared/data, which this clone does not have")
        line = shlex.join(capped(c.argv)) if cap else c.text
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, input="Hello!\n\n", text=True,
                              capture_output=True)
        assert done.returncode == 0, f"{c.where}: `{line}` failed:\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_the_tour_runs_as_written(tmp_path):
    run_with_bash(section_commands("A 5-minute tour"), scratch_repo(tmp_path), cap=False)


@pytest.mark.slow
def test_the_images_section_runs(tmp_path):
    commands = section_commands("Images")
    assert commands
    run_with_bash(commands, scratch_repo(tmp_path), cap=True)


def test_the_python_api_block_runs(tmp_path, monkeypatch):
    blocks = [body for lang, body, _, section in fenced_blocks(README) if lang == "python" and section == "Python API"]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md (Python API)", "exec"), {"__name__": "readme"})
    assert "161532" in out.getvalue()  # what the block's comment says count_trainable prints
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

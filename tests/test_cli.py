"""The `llama-adapter` command, in-process."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import llama_adapter as la
from llama_adapter.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_generate_prints_what_the_library_generates(tiny, tiny_folder, capsys):
    model, tok = tiny
    expected = la.generate(model, tok, ["the quick brown"], max_new_tokens=6)[0]
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "the quick brown", "--no-chat",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_session_over_stdin(tiny_folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nsay yes\n\n"))
    assert main(["chat", "--model", str(tiny_folder), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and out.count("you> ") == 4


def test_params_for_the_paper_v1_recipe(capsys):
    assert main(["params", "--recipe", str(ROOT / "recipes" / "v1_llama7b_alpaca.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 1_229_760


def test_finetune_then_generate_with_adapter(tiny_folder, tmp_path, capsys):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "say hello", "input": "", "output": "hello world"},
                                {"instruction": "count", "input": "to three", "output": "one two three"}] * 4))
    out = tmp_path / "run"
    assert main(["finetune", "--recipe", str(ROOT / "recipes" / "v1_smollm2_alpaca_cpu.yaml"),
                 f"model={tiny_folder}", f"data.train={data}", "data.val_size=2", "method.n_layers=2",
                 f"train.out_dir={out}", "train.max_steps=4", "train.progress=false", "train.threads=null",
                 "train.device=cpu", "train.eval_every=2", "train.save_every=2"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").stat().st_size < 100_000
    assert (out / "loss.png").is_file() and (out / "recipe.yaml").is_file()
    assert main(["generate", "--model", str(tiny_folder), "--adapter", str(out), "--prompt", "say hello",
                 "--no-chat", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    model, tok = la.load_pretrained(tiny_folder)
    la.load_adapter(model, out)
    assert capsys.readouterr().out == la.generate(model, tok, ["say hello"], max_new_tokens=3)[0] + "\n"
    assert torch.count_nonzero(model.layers[-1].self_attn.prefix.gate) > 0


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "error: no model at" in err and "nope" in err
    assert main(["finetune", "--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    assert main(["params", "--recipe", str(ROOT / "recipes" / "v1_llama7b_alpaca.yaml"), "method.n_layers=40"]) == 2
    assert "n_layers=40 adapted layers, but the model has only 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--recipe", str(ROOT / "recipes" / "v1_llama7b_alpaca.yaml"), "--bogus"])

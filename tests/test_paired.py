"""Paired comparison of two evaluations (McNemar's exact test) and `llama-adapter eval compare`."""

from __future__ import annotations

import json

import pytest

from llama_adapter.cli import main
from llama_adapter.eval.paired import compare_paired, mcnemar_p_value


@pytest.mark.parametrize(("a_only", "b_only", "p"), [
    (0, 5, 0.0625),  # 2 * 0.5**5
    (1, 9, 0.021484375),  # 2 * 11 / 1024
    (8, 2, 0.109375),  # R: binom.test(2, 10)$p.value = 0.1094
    (5, 5, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_exact_p_values(a_only, b_only, p):
    assert mcnemar_p_value(a_only, b_only) == pytest.approx(p, abs=1e-12)
    assert mcnemar_p_value(b_only, a_only) == mcnemar_p_value(a_only, b_only)


def test_paired_counts_ignore_agreements():
    a = [True, True, False, False, True, True]
    b = [True, False, True, False, False, False]
    r = compare_paired(a, b)
    assert (r.n, r.a_right, r.b_right, r.a_only, r.b_only) == (6, 4, 2, 3, 1)
    assert r.difference == pytest.approx(2 / 6) and r.p_value == pytest.approx(mcnemar_p_value(3, 1))
    with pytest.raises(ValueError, match="same problems"):
        compare_paired(a, b[:-1])


def test_format_says_which_way_the_difference_goes():
    r = compare_paired([True, False, False, False], [True, True, True, False])
    text = r.format("v1", "v2")
    assert text.startswith("v1: 1/4 right, v2: 3/4 right; v1 - v2 = -50.0 points; right only for v1: 0, only for v2: 2")
    text = compare_paired([True, True], [True, False]).format("x", "y")
    assert text.startswith("x: 2/2 right, y: 1/2 right; x - y = +50.0 points")


def write(path, rows):
    path.write_text("".join(json.dumps({"pid": pid, "prediction": 0, "correct": ok}) + "\n" for pid, ok in rows))
    return str(path)


def test_cli_compares_prediction_files_by_pid(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [(str(i), i < 12) for i in range(20)])
    b = write(tmp_path / "b.jsonl", [(str(i), i < 2) for i in reversed(range(20))])  # another order
    assert main(["eval", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert f"{a}: 12/20 right, {b}: 2/20 right; {a} - {b} = +50.0 points;" in out
    assert f"p = {mcnemar_p_value(10, 0):.3g}" in out
    c = write(tmp_path / "c.jsonl", [(str(i), True) for i in range(19)])
    assert main(["eval", "compare", a, c]) == 2
    assert "hold different problems" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"pid": "1", "correct": true}\n{"pid": "2"}\n')
    assert main(["eval", "compare", a, str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl, line 2" in capsys.readouterr().err

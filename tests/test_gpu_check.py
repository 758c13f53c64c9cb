"""bench/gpu_check.py runs end to end with --tiny on this CPU and writes every field a GPU run reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_and_reports_every_field(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the script finds the package in src/ by itself, as on a bare GPU machine
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    assert res["gpu_run"] is False and res["tiny"] is True and "no GPU run was made" in res["note"]
    assert "No GPU run was made" in (tmp_path / "gpu_check_tiny.md").read_text()
    assert set(res["train"]) == {"v1", "v2", "lavin", "peft_adaption_prompt"}
    for name, r in res["train"].items():
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["trainable"] > 0, name
        assert r.get("losses_finite", r.get("loss_finite")) is True, name
        assert "peak_memory_gib" in r
    for name in ("v1", "v2", "lavin"):
        assert res["train"][name]["achieved_tflops"] >= 0 and "mfu" in res["train"][name]
    assert res["train"]["v2"]["trainable"] > res["train"]["v1"]["trainable"]  # V2 trains far more than V1
    tokens = res["steps"] * res["batch"] * res["seq_len"]
    assert abs(tokens / res["train"]["v1"]["step_s"] / res["steps"] - res["train"]["v1"]["tokens_per_s"]) \
        < 0.01 * res["train"]["v1"]["tokens_per_s"] + 0.2
    assert [d["batch"] for d in res["decode"]] == [1, 16]
    assert all(d["tokens_per_s"] > 0 and "bandwidth_bound_tokens_per_s" in d for d in res["decode"])
    hours = res["projection"]["paper_v1_tokens"] / res["train"]["v1"]["tokens_per_s"] / 3600
    assert res["projection"]["paper_v1_tokens"] == 52_002 * 5 * 512
    assert abs(res["projection"]["device_hours"] - hours) < 1e-3 * hours + 1e-3
    assert res["v1_over_peft"] > 0
    assert set(res["targets"]) == {"v1_at_least_1.5x_peft", "v1_mfu_at_least_0.40", "paper_v1_at_most_1_h100_hour"}
    assert all(v is None for v in res["targets"].values())  # not judged without a GPU

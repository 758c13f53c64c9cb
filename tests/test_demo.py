"""`llama-adapter demo`: its training records, its blank-image control, and a whole run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from llama_adapter.data.synth import reply_text, synthesize
from llama_adapter.demo import (
    RECIPE,
    DemoConfig,
    loss_summary,
    one_question_records,
    report,
    synthetic_set,
    train_and_score,
)


def test_one_question_records_keep_each_chosen_question_with_its_image(tmp_path):
    s = synthesize(tmp_path / "synth", 12, seed=3, n_test=1, ocr_words=0)
    path = one_question_records(s.llava_train, ("count", "colour"), tmp_path / "synth" / "demo.json")
    records = json.loads(path.read_text())
    images = {v["image"]: v for v in json.loads(s.images.read_text()).values() if v["split"] == "train"}
    count = [r for r in records if r["qtype"] == "count"]
    colour = [r for r in records if r["qtype"] == "colour"]
    assert sorted(r["image"] for r in count) == sorted(images)  # one count question per image
    singles = {k for k, v in images.items() if len(v["shapes"]) == 1}
    assert 0 < len(singles) < 12 and {r["image"] for r in colour} == singles  # colour: asked of single shapes
    assert len(colour) == len(count) == len(records) / 2  # repeated until the types are balanced
    for r in records:
        shapes = images[r["image"]]["shapes"]
        human, gpt = r["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        answer = str(len(shapes)) if r["qtype"] == "count" else shapes[0]["colour"]
        assert len(shapes) == 1 or r["qtype"] == "count"  # colour questions are asked of single shapes
        assert gpt["value"] == reply_text(answer)


def test_blank_control_swaps_in_a_grey_image_of_the_same_size(tmp_path, monkeypatch):
    import llama_adapter.eval.vqa as vqa

    s = synthesize(tmp_path / "synth", 2, seed=1, n_test=2, ocr_words=0, image_size=96)
    seen = []

    def fake_complete(model, tok, ids, sampling, images):
        seen.extend((Path(im).name, Image.open(im).convert("RGB")) for im in images)
        return ["3."] * len(ids)

    monkeypatch.setattr(vqa, "complete_ids", fake_complete)
    monkeypatch.setattr(vqa, "prompt_ids", lambda *a, **k: [1, 2])

    class Model:
        def eval(self):
            return self

    looked, blank = vqa.evaluate_with_blank_control(Model(), None, s.llava_test, "plain", qtypes={"count"})
    n = len(looked.predictions)
    assert n == 2 and len(blank.predictions) == n and looked.by_type["count"] == blank.by_type["count"]
    assert all(name.startswith("test_") for name, _ in seen[:n])
    assert [im.size for _, im in seen[n:]] == [(96, 96)] * n  # files, so that a feature cache encodes it once
    assert all(im.getextrema() == ((128, 128),) * 3 for _, im in seen[n:])


def test_loss_summary_reads_the_run_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "loss": 10.0 - i}) + "\n" for i in range(10))
                   + json.dumps({"step": 10, "val_loss": 1.0}) + "\n")
    assert loss_summary(log, points=2) == "step 1: 9.50, step 10: 1.50"  # each the mean of it and its neighbour


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"] = str(tiny_folder)
    recipe["method"].update(prompt_len=2, n_layers=2, visual_hidden=8)
    recipe["train"].update(batch_size=2, warmup_steps=1, progress=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    cfg = DemoConfig(out=str(tmp_path / "demo"), steps=3, images=6, test_images=2, recipe=str(tmp_path / "tiny.yaml"))

    r = train_and_score(cfg)
    assert r.train.steps == 3 and (r.train.out_dir / "loss.png").is_file()
    assert {rec.meta["qtype"] for rec in r.test} <= set(cfg.qtypes) and "count" in r.with_image.counts
    assert len(r.with_image.predictions) == len(r.blank.predictions) == len(r.test) > 0
    text = report(r, show=1)
    assert "with the image | with a blank grey image instead | chance" in text
    assert f"count {r.with_image.counts['count']:4d}" in text.replace("count    ", "count ")
    assert str(r.test[0].image) in text and f"reference: {r.test[0].meta['answer']}" in text
    assert f"loss curve: {r.train.out_dir / 'loss.png'}" in text

    # a second run reuses the synthetic set (and so the cached features); another size writes a new one
    before = (tmp_path / "demo" / "synth" / "meta.json").stat().st_mtime_ns
    assert synthetic_set(tmp_path / "demo" / "synth", 6, 2).joinpath("meta.json").stat().st_mtime_ns == before
    synthetic_set(tmp_path / "demo" / "synth", 5, 2)
    assert json.loads((tmp_path / "demo" / "synth" / "meta.json").read_text())["counts"]["train_images"] == 5

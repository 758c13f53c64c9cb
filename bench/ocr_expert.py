"""The OCR expert (LLaMA-Adapter V2's expert models): rendered-word images of the synthetic set,
"What word is written in the image?", answered by SmolLM2-135M with no training at all, with
and without the OCR expert's text in the context slot.

    python bench/ocr_expert.py [--synth runs/synth] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.data.synth import synthesize  # noqa: E402
from llama_adapter.eval.ocr import QUESTION, contains_word, ocr_replies  # noqa: E402
from llama_adapter.experts import load_expert  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", default="runs/synth")
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    synth = Path(args.synth)
    if not (synth / "meta.json").is_file():
        synthesize(synth, 2000, seed=0)
    records = json.loads((synth / "ocr_test.json").read_text())[: args.limit]
    model, tok = la.load_pretrained("smollm2-135m")
    t0 = time.perf_counter()
    without = ocr_replies(model, tok, records, synth, experts=[])
    t1 = time.perf_counter()
    with_ocr = ocr_replies(model, tok, records, synth, experts=[load_expert("ocr")])
    t2 = time.perf_counter()
    acc = {name: sum(contains_word(r, rec["answer"]) for r, rec in zip(replies, records)) / len(records)
           for name, replies in (("without_expert", without), ("with_ocr_expert", with_ocr))}
    figures = {"n": len(records), "question": QUESTION, "accuracy": acc,
               "seconds": {"without_expert": t1 - t0, "with_ocr_expert": t2 - t1},
               "examples": [{"image": rec["image"], "word": rec["answer"], "without": a, "with_ocr": b}
                            for rec, a, b in list(zip(records, without, with_ocr))[:8]]}
    table = (f"SmolLM2-135M, no training, {len(records)} rendered-word test images of the synthetic set; "
             f"a reply is right when it contains the word.\n\n| | accuracy |\n|---|---|\n"
             f"| without expert | {acc['without_expert']:.1%} |\n"
             f"| with the OCR expert | {acc['with_ocr_expert']:.1%} |\n")
    write_results("ocr_expert", figures, table, machine_info())
    print(table)


if __name__ == "__main__":
    main()

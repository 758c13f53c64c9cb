"""McNemar's exact test between two committed synth_vqa.py results on the same test questions, optionally
one question type: whether two methods' accuracies differ by more than chance, question by question.

    python bench/pair_synth.py v2_synth_4k_1800steps_rescored v1mm_synth_v2_exposure_1593steps --qtype colour_of
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load_run(run: str) -> tuple[list[str], list[bool]]:
    """(question type, correct with the image) per test question of bench/results/<run>.json."""
    path = RESULTS / f"{run}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file")
    data = json.loads(path.read_text())
    if "correct_with_image" not in data:
        raise SystemExit(f"{path}: no per-question results (score the run again with the current synth_vqa.py)")
    return data["question_types"], data["correct_with_image"]


def main() -> None:
    from llama_adapter.eval.paired import compare_paired

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="RUN: a bench/results/<RUN>.json of synth_vqa.py")
    ap.add_argument("b", help="RUN")
    ap.add_argument("--qtype", help="only the test questions of this type (colour_of, yes_no, ...)")
    args = ap.parse_args()
    (types_a, a), (types_b, b) = load_run(args.a), load_run(args.b)
    if types_a != types_b:
        raise SystemExit(f"{args.a} and {args.b} were scored on different test questions; they do not pair")
    if args.qtype:
        if args.qtype not in types_a:
            raise SystemExit(f"no test questions of type {args.qtype!r} (types: {', '.join(sorted(set(types_a)))})")
        keep = [t == args.qtype for t in types_a]
        a, b = [x for x, k in zip(a, keep) if k], [x for x, k in zip(b, keep) if k]
    print(compare_paired(a, b).format(args.a, args.b) + (f" (type {args.qtype})" if args.qtype else ""))


if __name__ == "__main__":
    main()

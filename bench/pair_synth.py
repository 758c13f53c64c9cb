"""McNemar's exact test between two committed synth_vqa.py results on the same test questions, optionally
one question type: whether two methods' accuracies differ by more than chance, question by question.

    python bench/pair_synth.py v2_synth_4k_1800steps_rescored v1mm_synth_v2_exposure_1593steps_rescored \
        --qtype colour_of
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_paired, read_results  # noqa: E402


def load_run(run: str) -> tuple[list[str], list[bool]]:
    """(question type, correct with the image) per test question of bench/results/<run>.json."""
    path, data = read_results(run)
    if "correct_with_image" not in data:
        raise SystemExit(f"{path}: no per-question results (score the run again with the current synth_vqa.py)")
    return data["question_types"], data["correct_with_image"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="RUN: a bench/results/<RUN>.json of synth_vqa.py")
    ap.add_argument("b", help="RUN")
    ap.add_argument("--qtype", help="only the test questions of this type (colour_of, yes_no, ...)")
    args = ap.parse_args()
    (types_a, a), (types_b, b) = load_run(args.a), load_run(args.b)
    if types_a != types_b:
        raise SystemExit(f"{args.a} and {args.b} were scored on different test questions; they do not pair")
    if args.qtype and args.qtype not in types_a:
        raise SystemExit(f"no test questions of type {args.qtype!r} (types: {', '.join(sorted(set(types_a)))})")
    keep = [t == args.qtype for t in types_a] if args.qtype else None
    print_paired(a, b, args.a, args.b, keep, f"type {args.qtype}" if args.qtype else "")


if __name__ == "__main__":
    main()

"""McNemar's exact test between two rows of committed compare_methods results, also across runs: runs on the
same validation problems (the same --val-limit) score the same problems in the same order, so their rows pair
problem by problem. Optionally restricted to one ScienceQA group (IMG, NAT, G1-6, ...).

    python bench/pair_rows.py compare_choice_300steps_val300_experts:LaVIN \
        "compare_choice_300steps_val300_rest:LaVIN (no images)" [--group IMG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_paired, read_results, scienceqa_validation  # noqa: E402


def load_row(ref: str) -> tuple[int, list[bool]]:
    """("RUN:ROW") -> (the run's --val-limit, the row's per-problem correctness)."""
    run, sep, row = ref.partition(":")
    if not sep or not row:
        raise SystemExit(f"{ref!r}: expected RUN:ROW, such as compare_choice_300steps_val300:V1")
    path, data = read_results(run)
    rows = {r["row"]: r for r in data.get("scienceqa", [])}
    if row not in rows or "correct" not in rows[row]:
        raise SystemExit(f"{path}: no ScienceQA row {row!r} with per-problem results (rows: {', '.join(rows)})")
    return data["val_limit"], rows[row]["correct"]


def main() -> None:
    from llama_adapter.eval.scienceqa import GROUPS, groups_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="RUN:ROW (RUN: a bench/results/<RUN>.json of compare_methods)")
    ap.add_argument("b", help="RUN:ROW")
    ap.add_argument("--group", choices=GROUPS, help="only the validation problems of this group")
    args = ap.parse_args()
    (limit_a, a), (limit_b, b) = load_row(args.a), load_row(args.b)
    if limit_a != limit_b or len(a) != len(b):
        raise SystemExit(f"{args.a} and {args.b} were scored on different validation problems "
                         f"(--val-limit {limit_a} vs {limit_b}); they do not pair")
    keep = [args.group in groups_of(p) for p in scienceqa_validation(limit_a)[1]] if args.group else None
    print_paired(a, b, args.a, args.b, keep, f"group {args.group}" if args.group else "")


if __name__ == "__main__":
    main()

"""Whether two models' accuracies on the same problems differ by more than chance: McNemar's exact test.

Why: on a few hundred validation problems a gap of several points can be noise, and two
rows of a comparison answer the same problems, so their results are paired. Only the
problems that exactly one of the two gets right carry information; if the models were
equally good, each of those would go either way with probability 1/2. The p-value is the
two-sided binomial tail of the observed split (exact, so it holds for few disagreements).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path

from ..fileio import read_json_lines


@dataclass(frozen=True)
class PairedComparison:
    n: int  # problems both were scored on
    a_right: int
    b_right: int
    a_only: int  # right for A, wrong for B
    b_only: int
    p_value: float  # two-sided exact McNemar

    @property
    def difference(self) -> float:
        """A's accuracy minus B's."""
        return (self.a_right - self.b_right) / self.n if self.n else 0.0

    def format(self, a: str = "A", b: str = "B") -> str:
        """One line: both scores, the signed difference written as "A - B" so that it reads one way only,
        the discordant counts and the p-value."""
        return (f"{a}: {self.a_right}/{self.n} right, {b}: {self.b_right}/{self.n} right; "
                f"{a} - {b} = {100 * self.difference:+.1f} points; right only for {a}: {self.a_only}, "
                f"only for {b}: {self.b_only}; McNemar exact p = {self.p_value:.3g}")


def mcnemar_p_value(a_only: int, b_only: int) -> float:
    """Two-sided exact p-value of `a_only` against `b_only` discordant pairs under p = 1/2."""
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be non-negative")
    n = a_only + b_only
    tail = sum(comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_paired(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedComparison:
    """Compare two per-problem correctness lists over the same problems, in the same order."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired results need the same problems: {len(a_correct)} against {len(b_correct)}")
    a_only = sum(bool(x) and not y for x, y in zip(a_correct, b_correct))
    b_only = sum(bool(y) and not x for x, y in zip(a_correct, b_correct))
    return PairedComparison(len(a_correct), sum(map(bool, a_correct)), sum(map(bool, b_correct)),
                            a_only, b_only, mcnemar_p_value(a_only, b_only))


def read_correct(path: str | Path) -> dict[str, bool]:
    """pid -> correct, from a predictions file that `write_predictions` (`eval scienceqa --out`) wrote."""
    out: dict[str, bool] = {}
    for line_no, row in read_json_lines(path, "predictions file"):
        try:
            out[str(row["pid"])] = bool(row["correct"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {line_no}: not a prediction record with pid and correct ({e})") from e
    return out


def compare_prediction_files(a: str | Path, b: str | Path) -> PairedComparison:
    """Compare two predictions files on the same problems (matched by pid; both must hold the same pids)."""
    ra, rb = read_correct(a), read_correct(b)
    if ra.keys() != rb.keys():
        only = sorted(ra.keys() ^ rb.keys())
        raise ValueError(f"{a} and {b} hold different problems ({len(only)} pids in one only, e.g. {only[:3]})")
    pids = sorted(ra)
    return compare_paired([ra[p] for p in pids], [rb[p] for p in pids])

"""Which ScienceQA problems a run uses: one split, one side of the development protocol, the first N.

Shared by `llama-adapter eval scienceqa` and `llama-adapter data scienceqa`, so that training data
and evaluation choose their problems alike.
"""

from __future__ import annotations

from pathlib import Path

from .scienceqa import PROTOCOLS, Problem, load_scienceqa


def select_scienceqa(problems_file: str | Path, images: str | Path | None = None, *, split: str | None = None,
                     protocol: str | None = None, missing_images: str | None = None,
                     limit: int | None = None) -> list[Problem]:
    """The problems of `problems_file` that the options choose.

    Defaults follow the protocol: its training side ("dev-train") gives a problem whose image file is missing as
    text only (else that is an error), and its validation side ("dev-val") reads only the dev split.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    missing = missing_images or ("text" if protocol == "dev-train" else "error")
    split = split or ("dev" if protocol == "dev-val" else None)  # validation problems are all dev problems
    problems = load_scienceqa(problems_file, images, split=split, missing_images=missing)
    if protocol:
        problems = PROTOCOLS[protocol](problems)
    problems = problems[:limit] if limit else problems
    if not problems:
        raise ValueError(f"{problems_file}: no problems left (check --split / --protocol)")
    return problems

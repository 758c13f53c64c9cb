"""Held-out response likelihood: the mean per-token negative log-likelihood of reference
responses (Alpaca prompt template), the instruction-following measure of the comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.formats import InstructionRecord, read_alpaca
from ..data.instructions import encode_records
from ..data.sources import DataConfig
from ..data.tokenize import collate
from ..loss import lm_loss


def held_out_alpaca(train_file: str | Path, pool_file: str | Path, n: int | None = None) -> list[InstructionRecord]:
    """Records of `pool_file` whose instruction does not appear in `train_file`."""
    seen = {r.instruction for r in read_alpaca(train_file)}
    held = [r for r in read_alpaca(pool_file) if r.instruction not in seen]
    return held[:n] if n else held


@torch.no_grad()
def response_nll(model, tok, records: list[InstructionRecord], template: str = "alpaca", max_len: int = 256,
                 batch_size: int = 8) -> float:
    examples = encode_records(records, tok, DataConfig(train="-", template=template, max_len=max_len,
                                                       on_long_prompt="skip"))
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], tok.pad_id).to(model.device)
        total += float(lm_loss(model, batch))
        tokens += batch.n_label_tokens
    return total / max(tokens, 1)

"""Log-probabilities of the generated tokens (and of an echoed prompt's), in OpenAI's two response shapes (chat and
legacy completions).

Why the model's own distribution: a caller scoring answers (the first token's top alternatives for a multiple
choice, a confidence) wants what the adapter assigns, so the values are log_softmax of the step's logits in fp32,
before temperature and top_p shape the sample (as vLLM reports them by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..model.tokenizer import Tokenizer

MAX_TOP_CHAT = 20  # OpenAI's bounds: top_logprobs on chat, logprobs on completions
MAX_TOP_COMPLETIONS = 5
ROWS_PER_PIECE = 256


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens of its step (id, log-probability), most likely
    first; both None for a prompt's first token (echo), which nothing predicts."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """Per row of logits [n, V]: the log-probability of `tokens[i]` and the `top[i]` most likely tokens (in pieces of
    `ROWS_PER_PIECE` rows: a long echoed prompt's fp32 log_softmax stays small)."""
    out = []
    for start in range(0, len(tokens), ROWS_PER_PIECE):
        rows = slice(start, start + ROWS_PER_PIECE)
        lp = logits[rows].float().log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(tokens[rows], device=lp.device)[:, None])[:, 0].tolist()
        k = max(top[rows])
        best = lp.topk(k, dim=-1) if k else None
        for i, (token, value, want) in enumerate(zip(tokens[rows], chosen, top[rows])):
            pairs: tuple[tuple[int, float], ...] = ()
            if best is not None and want:
                pairs = tuple(zip(best.indices[i, :want].tolist(), best.values[i, :want].tolist()))
            out.append(TokenLogprob(token, value, pairs))
    return out


def _text(tok: Tokenizer, token: int) -> str:
    """A token's own text (a piece of a multi-byte character decodes as U+FFFD, as OpenAI's `token` shows it)."""
    return tok.decode([token], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def one(token: int, value: float | None) -> dict[str, Any]:
        text = _text(tok, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top or ()]}
                        for e in entries], "refusal": None}


def completion_logprobs(tok: Tokenizer, entries: list[TokenLogprob], offset: int, top: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, their log-probabilities, their `top` alternatives
    ({text: log-probability}; null for 0) and where each token's text starts in the completion (from `offset`)."""
    tokens = [_text(tok, e.token) for e in entries]
    starts = []
    for text in tokens:
        starts.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else _by_text(tok, e.top) for e in entries] if top else None,
            "text_offset": starts}


def _by_text(tok: Tokenizer, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{text: logprob}, most likely first; tokens of the same text (pieces of characters) keep the likelier one."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(_text(tok, token), value)
    return out

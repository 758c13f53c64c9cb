"""Text generation: KV cache, batched left-padded prompts, sampling, stop strings, streaming."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batch import PreparedBatch
from .model.attached import prepares_inputs
from .model.fastpath import default_decode, prompt_front
from .model.fused import fuse_projections
from .model.llama import LlamaLM
from .model.tokenizer import Tokenizer


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token ids [B] of logits [B, V] (the first one on a tie, as argmax).

    Why not argmax: on a CPU it takes 200 us for one bf16 row of a 49k vocabulary, max's indices 50 us
    (1% of a decode step of the embedded model)."""
    return logits.max(-1).indices


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if s.temperature == 0:
        return greedy_tokens(logits)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def prepare_prompts(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[Sequence[int]],
                    images: Sequence[Any] | None) -> PreparedBatch:
    """Left-pad the prompts; an attached method may insert its own tokens (images, modality)."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    ids, mask = left_pad(prompt_ids, tok.pad_id, model.device)
    if prepares_inputs(model):
        return model.adapter.prepare_inputs(model, ids, mask, images)
    if images is not None and any(im is not None for im in images):
        raise ValueError("images were given, but the model has no visual adapter attached")
    return PreparedBatch(ids, None, mask, {})


def _cache_length(needed: int, limit: int, fast: bool) -> int:
    """Room past what is needed for the compiled step, whose step that writes a cache's last position decodes
    eagerly (model/fastpath.py); rounded up to 256 positions, few distinct sizes."""
    if not fast:
        return needed
    return max(needed, min(limit, -(-(needed + 1) // 256) * 256))


@torch.inference_mode()
def generate_tokens(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[Sequence[int]],
                    sampling: Sampling, images: Sequence[Any] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] step by step; finished rows yield the pad id."""
    fuse_projections(model)
    batch = prepare_prompts(model, tok, prompt_ids, images)
    limit = model.config.max_seq_len
    if batch.length >= limit:
        raise ValueError(f"prompt of {batch.length} tokens does not fit the model's context of {limit} "
                         f"(at least one position must stay free for the answer)")
    max_new = min(sampling.max_new_tokens, limit - batch.length)
    rows = batch.attention_mask.shape[0]
    fast = default_decode(model)
    size = _cache_length(batch.length + max_new, limit, fast is not None)
    if fast is not None and not fast.usable(size, rows):
        fast, size = None, batch.length + max_new
    cache = model.new_cache(rows, size, front=prompt_front(model) if fast is not None else 0)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    eos = torch.tensor(sorted(tok.eos_ids), device=model.device)
    mask = batch.attention_mask
    logits = model(batch.input_ids, inputs_embeds=batch.inputs_embeds, attention_mask=mask, cache=cache,
                   extras=batch.extras, output_positions=(slice(None), -1))
    # Keys each row may attend, kept in one buffer instead of concatenating a mask per step. A finished
    # row keeps decoding (its tokens are replaced by pad), so only live rows' keys matter; positions
    # count the attended tokens, as cumsum(mask) - 1 would at the new token.
    padded = not bool(mask.all())
    key_valid = torch.zeros((rows, size), dtype=torch.bool, device=model.device)
    key_valid[:, :batch.length] = mask.bool()
    positions = mask.long().sum(-1)
    done = torch.zeros(rows, dtype=torch.bool, device=model.device)
    for step in range(max_new):
        token = next_token(logits, sampling, generator).masked_fill(done, tok.pad_id)
        yield token
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new - 1:
            return
        past = cache.length
        key_valid[:, past] = True
        logits = fast.step(token, positions, cache, key_valid, batch.extras) if fast is not None else None
        if logits is None:  # the eager step: no fast path, or its graph is not compiled yet
            logits = model(token[:, None], attention_mask=key_valid[:, :past + 1] if padded else None,
                           position_ids=positions[:, None] if padded else None, cache=cache,
                           extras=batch.extras, output_positions=(slice(None), -1))
        positions = positions + 1


def encode_prompts(tok: Tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        return [tok.encode(tok.chat_prompt([{"role": "user", "content": p}]), add_special_tokens=False)
                for p in prompts]
    return [tok.encode(p) for p in prompts]


class TextTracker:
    """Turns a growing list of token ids into text deltas, cutting at EOS and stop strings."""

    def __init__(self, tok: Tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.emitted = ""
        self.finished = False

    def push(self, token: int) -> str:
        if self.finished:
            return ""
        if token in self.tok.eos_ids:
            self.finished = True
            return self.flush()
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.finished = True
                return self._emit(text[:at])
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        hold = max((len(s) - 1 for s in self.stop if s), default=0)
        # keep back a tail that could still turn into a stop string
        safe = len(text)
        for k in range(min(hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                safe = len(text) - k
                break
        return self._emit(text[:safe])

    def flush(self) -> str:
        return self._emit(self.tok.decode(self.ids)) if self.ids else ""

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text if text.startswith(self.emitted) else self.emitted
        return delta


def stream(model: LlamaLM, tok: Tokenizer, prompts: str | Sequence[str], *, images: Sequence[Any] | None = None,
           chat: bool = False, **sampling: Any) -> Iterator[list[str]]:
    """Yield, per step, the new text of each prompt (a list of deltas, "" where none)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    yield from stream_batch(model, tok, encode_prompts(tok, prompts, chat), Sampling(**sampling), images)


def stream_ids(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[int], sampling: Sampling,
               image: Any = None) -> Iterator[str]:
    """Text deltas for one already-encoded prompt (used by chat, whose template is applied by the caller)."""
    for deltas in stream_batch(model, tok, [prompt_ids], sampling, None if image is None else [image]):
        yield deltas[0]


def stream_batch(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[Sequence[int]], s: Sampling,
                 images: Sequence[Any] | None = None) -> Iterator[list[str]]:
    trackers = [TextTracker(tok, s.stop) for _ in prompt_ids]
    for tokens in generate_tokens(model, tok, prompt_ids, s, images):
        deltas = [t.push(int(x)) for t, x in zip(trackers, tokens.tolist())]
        if any(deltas):
            yield deltas
        if all(t.finished for t in trackers):
            return
    tails = [t.flush() if not t.finished else "" for t in trackers]
    if any(tails):
        yield tails


def complete_ids(model: LlamaLM, tok: Tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: Sampling,
                 images: Sequence[Any] | None = None) -> list[str]:
    """Complete already-encoded prompts (laid out by a data template) and return the texts."""
    out = [""] * len(prompt_ids)
    for deltas in stream_batch(model, tok, prompt_ids, sampling, images):
        out = [o + d for o, d in zip(out, deltas)]
    return out


def generate(model: LlamaLM, tok: Tokenizer, prompts: str | Sequence[str], images: Sequence[Any] | None = None,
             max_new_tokens: int = 64, chat: bool = False, **sampling: Any) -> list[str]:
    """Complete each prompt; returns the generated texts (without the prompts)."""
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    out = [""] * len(plist)
    for deltas in stream(model, tok, plist, images=images, chat=chat, max_new_tokens=max_new_tokens, **sampling):
        out = [o + d for o, d in zip(out, deltas)]
    return out

"""Log-probabilities of several continuations of one prompt, with the prompt run once.

Ranked-choice scoring asks how likely each of K answers is after the same prompt. Running prompt + answer
K times repeats the prompt's work K times (ScienceQA prompts run from 60 to 500 tokens, its answers are
about 7). Here the prompts run once, laid out as for generation (`prepare_prompts`: left padding, the
method's images and inserted tokens) into a cache with room for the continuations; its rows are copied to
one row per continuation, and all continuations then run together as one more step of that cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..generate import prepare_prompts
from ..model.fused import fuse_projections
from ..model.llama import LlamaLM, select_extras
from ..model.tokenizer import Tokenizer


def _check(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]) -> None:
    if len(continuations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    for i, conts in enumerate(continuations):
        if not conts or any(len(c) == 0 for c in conts):
            raise ValueError(f"prompt {i}: needs at least one continuation, each of at least one token")


@torch.inference_mode()
def continuation_logprobs(model: LlamaLM, tok: Tokenizer, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[Sequence[int]]],
                          images: Sequence[Any] | None = None) -> list[list[float]]:
    """Per prompt, per continuation: the summed log-probability of the continuation's tokens after the prompt
    (`images`: one per prompt, None for none, as `generate` takes them)."""
    _check(prompts, continuations)
    fuse_projections(model)
    batch = prepare_prompts(model, tok, prompts, images)
    dev = model.device
    owner = torch.tensor([i for i, conts in enumerate(continuations) for _ in conts], device=dev)
    flat = [list(c) for conts in continuations for c in conts]
    width = max(map(len, flat))
    ids = torch.full((len(flat), width), tok.pad_id, dtype=torch.long)
    for r, c in enumerate(flat):
        ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
    ids = ids.to(dev)
    cache = model.new_cache(len(prompts), batch.length + width - 1)  # room for all but each last token
    first = model(batch.input_ids, inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                  cache=cache, extras=batch.extras, output_positions=(slice(None), -1))
    logits = first[owner][:, None]  # [R, 1, V]: predicts each continuation's first token
    if width > 1:  # the last token's prediction is never needed
        cache = cache.select_rows(owner)
        prompt_mask = batch.attention_mask[owner]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(flat), width - 1)], dim=1)
        positions = prompt_mask.long().sum(-1)[:, None] + torch.arange(width - 1, device=dev)
        rest = model(ids[:, :-1], attention_mask=mask, position_ids=positions, cache=cache,
                     extras=select_extras(batch.extras, owner))
        logits = torch.cat([logits, rest], dim=1)
    logp = logits.float().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    lengths = torch.tensor([len(c) for c in flat], device=dev)
    logp = logp.double().masked_fill(torch.arange(width, device=dev)[None] >= lengths[:, None], 0.0)
    sums = logp.sum(-1).tolist()
    out, at = [], 0
    for conts in continuations:
        out.append(sums[at: at + len(conts)])
        at += len(conts)
    return out

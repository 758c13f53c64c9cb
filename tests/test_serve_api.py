"""The OpenAI-compatible server against the official `openai` client on loopback (issue 35).

A tiny random model with four saved adapters (two V1, a text-only LaVIN, a V1 that takes images) is
served by the real app under uvicorn; every answer is compared with the library run in-process on the
same model, adapter and prompt (greedy), which is the correctness anchor of these tests.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the openai client's own HTTP library, for the raw requests the client would not send
import openai
import pytest
import torch
import yaml
from serve_util import (
    CONTEXT,
    TinyZoo,
    build_zoo,
    data_url,
    image_message,
    load_reference,
    openai_client,
    paced,
    random_image,
    serve,
)

import llama_adapter as la
from llama_adapter.data.templates import render_prompt
from llama_adapter.generate import Sampling, generate_tokens, prepare_prompts, stream_ids
from llama_adapter.model.load import DEFAULT_MODEL
from llama_adapter.serve import ServeConfig

MAX_TOKENS = 1000  # the server's bound on max_tokens
LIMITS = dict(max_body_bytes=256_000, max_image_bytes=40_000, max_image_pixels=200_000, max_images=1)
QUESTION = "what colour is the triangle?"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> TinyZoo:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def config(zoo: TinyZoo, **kw: Any) -> Any:
    base: dict[str, Any] = dict(model=str(zoo.folder), adapters={n: str(p) for n, p in zoo.adapters.items()},
                                max_batch=8, max_queue=64, max_tokens=MAX_TOKENS, dtype="fp32", **LIMITS)
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module")
def run_folder(zoo) -> Path:
    """The v1 adapter in a training run's folder, whose recipe.yaml says it was trained on the Alpaca template."""
    folder = zoo.folder.parent / "v1-alpaca-run"
    shutil.copytree(zoo.adapters["v1"], folder)
    recipe = {"model": str(zoo.folder), "method": {"name": "adapter_v1", "prompt_len": 4, "n_layers": 2},
              "data": [{"train": "alpaca.json", "format": "alpaca", "kind": "instruction", "template": "alpaca"}]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def served(zoo, run_folder):
    adapters = {**{n: str(p) for n, p in zoo.adapters.items()}, "v1alpaca": str(run_folder)}
    with serve(config(zoo, adapters=adapters)) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    return openai_client(url)


@pytest.fixture(scope="module")
def refs(zoo):
    """name -> (model, tokenizer) loaded in-process, each once."""
    cache: dict[str, tuple[la.LlamaLM, la.Tokenizer]] = {}

    def get(name: str) -> tuple[la.LlamaLM, la.Tokenizer]:
        if name not in cache:
            cache[name] = load_reference(zoo, name)
        return cache[name]

    return get


@dataclass
class Reference:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def reference(refs, name: str, prompt_ids: list[int], image: Any = None, **sampling: Any) -> Reference:
    """What the library gives in-process: the text (stream_ids), the positions the prompt takes (a method may add
    tokens, as LaVIN's modality token) and the tokens generated before EOS (generate_tokens)."""
    model, tok = refs(name)
    s = Sampling(**sampling)
    images = None if image is None else [image]
    text = "".join(stream_ids(model, tok, prompt_ids, s, image=image))
    tokens: list[int] = []
    for t in generate_tokens(model, tok, [prompt_ids], s, images):
        tokens.append(int(t[0]))
        if tokens[-1] in tok.eos_ids:
            break
    finish = "stop" if tokens[-1] in tok.eos_ids else "length"
    with torch.inference_mode():
        positions = prepare_prompts(model, tok, [prompt_ids], images).length
    return Reference(text, positions, len([t for t in tokens if t not in tok.eos_ids]), finish)


def chat_ids(refs, name: str, messages: list[dict[str, Any]]) -> list[int]:
    tok = refs(name)[1]
    return tok.encode(tok.chat_prompt(messages), add_special_tokens=False)


def chat_reference(refs, name: str, text: str, image: Any = None, **sampling: Any) -> Reference:
    return reference(refs, name, chat_ids(refs, name, [{"role": "user", "content": text}]), image, **sampling)


def ask(client, model: str, text: str, max_tokens: int = 12, **kw: Any):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw)


def metrics(url: str, **headers: str) -> dict[str, float]:
    """GET /metrics parsed with prometheus_client: 'name{label="v",...}' (labels sorted) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def post(url: str, path: str, body: Any = None, content: bytes | None = None, **headers: str):
    if content is None:
        return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json", **headers},
                      timeout=60)


def assert_error(r, status: int, code: str | None = None, contains: str = "") -> dict[str, Any]:
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with the status expected."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if status == 400:
        assert err["type"] == "invalid_request_error", err
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err
    return err


def still_serves(client) -> None:
    out = ask(client, "base", "hello", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


# -------------------------------------------------------------------------------------------------
# listing


def test_health_and_models_list_base_and_every_adapter(url, client, zoo):
    r = httpx.get(f"{url}/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    listed = client.models.list()
    by_id = {m.id: m for m in listed.data}
    assert set(by_id) >= {"base", *zoo.adapters}
    assert all(m.object == "model" and m.owned_by == "llama-adapter" for m in listed.data)
    raw = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert raw["base"]["method"] is None and raw["base"]["images"] is False
    for name in ("v1", "v1b"):
        assert raw[name]["method"] == "adapter_v1" and raw[name]["images"] is False
    assert raw["lavin"]["method"] == "lavin" and raw["lavin"]["images"] is False
    assert raw["v1img"]["method"] == "adapter_v1" and raw["v1img"]["images"] is True


# -------------------------------------------------------------------------------------------------
# text: the server's greedy answers equal the library's


@pytest.mark.parametrize("name", ["base", "v1", "v1b", "lavin"])
def test_chat_non_stream_equals_in_process_generate(client, refs, name):
    want = chat_reference(refs, name, QUESTION, max_new_tokens=12)
    out = ask(client, name, QUESTION, max_tokens=12)
    assert out.object == "chat.completion" and out.model == name
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == want.prompt_tokens
    assert out.usage.completion_tokens == want.completion_tokens
    assert out.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_multi_turn_chat_with_a_system_message_uses_the_chat_template(client, refs):
    messages = [{"role": "system", "content": "you answer in colours"},
                {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "the circle is red"},
                {"role": "user", "content": QUESTION}]
    want = reference(refs, "v1b", chat_ids(refs, "v1b", messages), max_new_tokens=12)
    out = client.chat.completions.create(model="v1b", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == want.prompt_tokens


def test_an_adapter_trained_on_a_template_is_prompted_with_it(client, refs):
    """A run folder's recipe.yaml names the Alpaca template: chat messages are laid out as in training."""
    tok = refs("v1")[1]
    text, special = render_prompt("alpaca", tok, QUESTION)  # the layout the training data had
    want = reference(refs, "v1", tok.encode(text, add_special_tokens=special), max_new_tokens=12)
    out = ask(client, "v1alpaca", QUESTION, max_tokens=12)
    assert out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == want.prompt_tokens
    assert want.text != chat_reference(refs, "v1", QUESTION, max_new_tokens=12).text  # the layout matters


def test_the_base_folder_name_means_the_base(client, zoo):
    by_alias = ask(client, zoo.folder.name, QUESTION)
    assert by_alias.choices[0].message.content == ask(client, "base", QUESTION).choices[0].message.content


def test_adapters_really_change_the_answer(refs):
    """Otherwise the comparisons above and the batch test below would not tell adapters apart."""
    texts = {n: chat_reference(refs, n, QUESTION, max_new_tokens=12).text for n in ("base", "v1", "v1b", "lavin")}
    assert len(set(texts.values())) == 4, texts


@pytest.mark.parametrize("name", ["v1", "lavin"])
def test_chat_stream_equals_in_process_stream(client, refs, name):
    want = chat_reference(refs, name, QUESTION, max_new_tokens=20)
    chunks = list(ask(client, name, QUESTION, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert with_choices[-1].choices[0].finish_reason == want.finish_reason
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (want.prompt_tokens, want.completion_tokens)


def test_stream_is_server_sent_events_ending_with_done(url, refs):
    want = chat_reference(refs, "v1b", QUESTION, max_new_tokens=8)
    body = {"model": "v1b", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.strip()]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want.text


def test_completions_plain_prompt_equals_la_generate(client, refs):
    model, tok = refs("v1")
    prompt = "the quick brown fox"
    out = client.completions.create(model="v1", prompt=prompt, max_tokens=10, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == la.generate(model, tok, prompt, max_new_tokens=10)[0]
    want = reference(refs, "v1", tok.encode(prompt), max_new_tokens=10)
    assert out.choices[0].finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    streamed = client.completions.create(model="v1", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def reference_logprobs(refs, name: str, prompt_ids: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens the library generates in-process (EOS excluded) and, for each, its step's log-probabilities
    [n, V] from one forward pass over the prompt and the tokens before it."""
    model, tok = refs(name)
    ids: list[int] = []
    for t in generate_tokens(model, tok, [prompt_ids], Sampling(max_new_tokens=tokens, temperature=0)):
        if int(t[0]) in tok.eos_ids:
            break
        ids.append(int(t[0]))
    return ids, next_token_logprobs(refs, name, prompt_ids + ids[:-1])[len(prompt_ids) - 1:]


def next_token_logprobs(refs, name: str, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i the log-probabilities of the token after ids[i], from one forward pass."""
    with torch.inference_mode():
        return refs(name)[0](torch.tensor([ids]))[0].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_own(client, refs):
    tok = refs("v1")[1]
    ids, want = reference_logprobs(refs, "v1", chat_ids(refs, "v1", [{"role": "user", "content": QUESTION}]), 10)
    out = ask(client, "v1", QUESTION, max_tokens=10, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == len(ids)
    for entry, token, lp in zip(content, ids, want):
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(lp[token].item(), abs=1e-4)
        best = lp.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i], skip_special_tokens=False)
                                                          for i in best.indices.tolist()]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the most likely token
    plain = ask(client, "v1", QUESTION, max_tokens=10)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content
    streamed = list(ask(client, "v1", QUESTION, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_with_offsets_and_alternatives(client, refs):
    tok = refs("base")[1]
    prompt = "the quick brown fox"
    ids, want = reference_logprobs(refs, "base", tok.encode(prompt), 8)
    out = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs == pytest.approx([w[t].item() for w, t in zip(want, ids)], abs=1e-4)
    for alternatives, w in zip(lp.top_logprobs, want):  # {text: logprob}: tokens of the same text share an entry
        best = w.topk(2)
        texts = [tok.decode([i], skip_special_tokens=False) for i in best.indices.tolist()]
        assert set(alternatives) == set(texts)
        for text, value in alternatives.items():
            assert value == pytest.approx(max(v for t, v in zip(texts, best.values.tolist()) if t == text), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    streamed = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                         stream=True)
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset  # offsets run on across the chunks
    none = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    assert none.choices[0].logprobs.top_logprobs is None
    assert none.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs)


def test_echo_scores_the_prompt(client, refs, url):
    tok = refs("base")[1]
    prompt = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(prompt)
    want = next_token_logprobs(refs, "v1", ids)
    scored = client.completions.create(model="v1", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:] == pytest.approx([want[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-4)
    assert [list(d.values())[0] for d in lp.top_logprobs[1:]] == pytest.approx(want[:-1].max(-1).values.tolist(),
                                                                               abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # echo with an answer: the prompt's entries, then the generated tokens' (as without echo)
    both = client.completions.create(model="v1", prompt=prompt, max_tokens=6, echo=True, logprobs=1, temperature=0)
    alone = client.completions.create(model="v1", prompt=prompt, max_tokens=6, logprobs=1, temperature=0)
    assert both.choices[0].text == prompt + alone.choices[0].text
    assert both.choices[0].logprobs.tokens == lp.tokens + alone.choices[0].logprobs.tokens
    assert both.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx(alone.choices[0].logprobs.token_logprobs,
                                                                                abs=1e-4)
    chunks = list(client.completions.create(model="v1", prompt=prompt, max_tokens=6, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks if c.choices) == both.choices[0].text
    # a tokenizing client sends the ids themselves (alone, or as a list of one prompt)
    for as_ids in (ids, [ids]):
        same = client.completions.create(model="v1", prompt=as_ids, max_tokens=0, echo=True, logprobs=1)
        assert same.choices[0].text == tok.decode(ids, skip_special_tokens=False)
        assert same.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    two = client.completions.create(model="v1", prompt=[ids, ids[:4]], max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in two.choices] == [tok.decode(p, skip_special_tokens=False) for p in (ids, ids[:4])]
    assert two.choices[1].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:4], abs=1e-5)
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": [5, 10 ** 9], "max_tokens": 1}), 400,
                 contains=str(10 ** 9))
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": "a", "max_tokens": 0}), 400)
    err = assert_error(post(url, "/v1/completions", {"model": "lavin", "prompt": "a", "echo": True}), 400)
    assert err["param"] == "echo" and "lavin" in err["message"]


def test_n_choices_and_several_prompts(client, url):
    one = ask(client, "v1", QUESTION, max_tokens=8)
    three = ask(client, "v1", QUESTION, max_tokens=8, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy: the same answer
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the choices share their prompt
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    # sampled: choice i is the sample of seed + i, as a request of its own with that seed gives it
    sampled = ask(client, "v1", QUESTION, max_tokens=12, n=3, temperature=1.0, seed=7)
    alone = [ask(client, "v1", QUESTION, max_tokens=12, temperature=1.0, seed=7 + i).choices[0].message.content
             for i in range(3)]
    assert [c.message.content for c in sampled.choices] == alone
    assert len(set(alone)) > 1
    streamed: dict[int, str] = {}
    for c in ask(client, "v1", QUESTION, max_tokens=12, n=3, temperature=1.0, seed=7, stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == alone
    # completions: a list of prompts, n each; choice p * n + i is prompt p's i-th
    prompts = ["the quick brown fox", "hello world"]
    many = client.completions.create(model="base", prompt=prompts, max_tokens=6, n=2, temperature=1.0, seed=3)
    want = [client.completions.create(model="base", prompt=p, max_tokens=6, temperature=1.0, seed=3 + i).choices[0].text
            for p in prompts for i in range(2)]
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == want
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": ["a"] * 17, "max_tokens": 1}), 400)
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": ["a"] * 4, "n": 5, "max_tokens": 1}), 400,
                 contains="20 choices")
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": ["a", ""], "max_tokens": 1}), 400)


def test_stop_string_cuts_the_answer(client, refs):
    full = chat_reference(refs, "v1b", QUESTION, max_new_tokens=24).text
    # a stop string of two printable characters found in the middle of the greedy answer
    at = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    stop = full[at:at + 2]
    want = full[:full.find(stop)]
    model, tok = refs("v1b")
    assert la.generate(model, tok, QUESTION, chat=True, max_new_tokens=24, stop=(stop,))[0] == want
    out = ask(client, "v1b", QUESTION, max_tokens=24, stop=[stop])
    assert out.choices[0].message.content == want
    assert out.choices[0].finish_reason == "stop"
    out = ask(client, "v1b", QUESTION, max_tokens=24, stop=stop)  # a single string works too
    assert out.choices[0].message.content == want


def test_max_tokens_gives_finish_reason_length(client, refs):
    want = chat_reference(refs, "v1", QUESTION, max_new_tokens=3)
    assert want.finish_reason == "length"  # no EOS within 3 tokens, so the bound is what stops it
    out = ask(client, "v1", QUESTION, max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3
    assert out.choices[0].message.content == want.text
    # max_completion_tokens, the newer name, bounds it too
    out = client.chat.completions.create(model="v1", messages=[{"role": "user", "content": QUESTION}],
                                         max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].message.content == want.text


def test_seed_makes_sampling_reproducible(client, refs):
    def sample(seed: int) -> str:
        return ask(client, "v1", QUESTION, max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other  # 16 tokens sampled at temperature 1 from a 400-token vocabulary
    model, tok = refs("v1")  # and the same draws as the library's own seeded sampling
    assert first == la.generate(model, tok, QUESTION, chat=True, max_new_tokens=16, temperature=1.0, seed=7)[0]


# -------------------------------------------------------------------------------------------------
# images


def test_image_request_to_the_image_adapter(client, refs):
    image, other = random_image(seed=0), random_image(seed=11)
    ids = chat_ids(refs, "v1img", [{"role": "user", "content": QUESTION}])
    want = reference(refs, "v1img", ids, image=image, max_new_tokens=10)
    out = client.chat.completions.create(model="v1img", messages=[image_message(QUESTION, data_url(image))],
                                         max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want.text
    assert out.usage.completion_tokens == want.completion_tokens
    # the image is really used: another picture gives another answer, in the server as in-process
    out2 = client.chat.completions.create(model="v1img", messages=[image_message(QUESTION, data_url(other))],
                                          max_tokens=10, temperature=0)
    assert out2.choices[0].message.content == reference(refs, "v1img", ids, image=other, max_new_tokens=10).text
    assert out2.choices[0].message.content != out.choices[0].message.content
    # JPEG and WebP decode as well
    for fmt in ("JPEG", "WEBP"):
        got = client.chat.completions.create(model="v1img", messages=[image_message(QUESTION, data_url(image, fmt))],
                                             max_tokens=4, temperature=0)
        assert got.choices[0].finish_reason in ("stop", "length")


def image_request(url: str, model: str, *urls: str):
    return post(url, "/v1/chat/completions", {"model": model, "messages": [image_message(QUESTION, *urls)],
                                              "max_tokens": 4, "temperature": 0})


def test_image_for_a_text_only_adapter_is_400_naming_it(url, client):
    for name in ("v1", "lavin"):
        assert_error(image_request(url, name, data_url(random_image())), 400, contains=name)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="v1b", messages=[image_message(QUESTION, data_url(random_image()))],
                                       max_tokens=4)
    assert "v1b" in str(e.value)
    still_serves(client)


def huge_png_header() -> bytes:
    """A tiny PNG file whose header declares 50 000 x 50 000 pixels (a decompression bomb's signature)."""
    png = base64.b64decode(data_url(random_image(8, 8)).split(",", 1)[1])
    ihdr = b"IHDR" + struct.pack(">II", 50_000, 50_000) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


@pytest.mark.parametrize("bad", [
    "http://127.0.0.1:9/picture.png",  # remote: refused without --allow-remote-images (and never fetched)
    "https://example.com/picture.png",
    "file:///etc/hostname",  # a local path
    "/etc/hostname",
    "data:image/png;base64,@@@ not base64 @@@",
    "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode(),
    "data:text/plain;base64," + base64.b64encode(b"hello").decode(),
    data_url(random_image())[:200],  # a PNG cut short
    "data:image/png;base64," + base64.b64encode(huge_png_header()).decode(),  # 50 000 x 50 000 declared
])
def test_bad_image_urls_are_400(url, client, bad):
    assert_error(image_request(url, "v1img", bad), 400)
    still_serves(client)


def test_image_limits_are_400(url, client):
    small = data_url(random_image())
    assert_error(image_request(url, "v1img", small, small), 400)  # max_images=1
    from PIL import Image

    big = data_url(Image.new("RGB", (600, 600), (200, 30, 30)))  # 360 000 pixels > 200 000, in a small file
    assert len(big) < LIMITS["max_image_bytes"]
    assert_error(image_request(url, "v1img", big), 400)
    heavy = random_image(150, 150)  # few pixels, but a ~67 kB PNG > 40 000 bytes (body stays under its limit)
    assert LIMITS["max_image_bytes"] < len(data_url(heavy)) < LIMITS["max_body_bytes"]
    assert_error(image_request(url, "v1img", data_url(heavy)), 400)
    still_serves(client)


# -------------------------------------------------------------------------------------------------
# batching


def concurrently(calls: list[Any]) -> list[Any]:
    """Run the calls in threads released together; returns results (or the exception raised) in order."""
    out: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as e:  # the test inspects it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_adapters_batched_together_give_the_tokens_each_gives_alone(client, refs, url):
    names = ["base", "v1", "v1b", "lavin", "v1", "v1b"]
    prompts = [QUESTION, QUESTION, QUESTION, QUESTION, "hello world", "say yes"]
    n = 60
    alone = [ask(client, m, p, max_tokens=n).choices[0].message.content for m, p in zip(names, prompts)]
    for m, p, text in zip(names, prompts, alone):
        assert text == chat_reference(refs, m, p, max_new_tokens=n).text, m
    before = metrics(url)
    together = concurrently([lambda m=m, p=p: ask(client, m, p, max_tokens=n) for m, p in zip(names, prompts)])
    after = metrics(url)
    assert [r.choices[0].message.content for r in together] == alone
    # they really shared decode steps: rows of all four models (three adapters and the base) in one forward pass
    assert steps_with_more_than(before, after, "llama_adapter_decode_batch_rows", 4) > 0
    assert steps_with_more_than(before, after, "llama_adapter_decode_batch_adapters", 3) > 0


def test_logprobs_of_rows_in_a_shared_batch_are_those_of_each_alone(client):
    asks = [("v1", {"logprobs": True, "top_logprobs": 2}), ("v1b", {}), ("base", {"logprobs": True}),
            ("lavin", {"logprobs": True, "top_logprobs": 1}), ("v1", {})]

    def entries(reply: Any) -> Any:
        lp = reply.choices[0].logprobs
        return None if lp is None else [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in lp.content]

    alone = [ask(client, m, QUESTION, max_tokens=24, **kw) for m, kw in asks]
    together = concurrently([lambda m=m, kw=kw: ask(client, m, QUESTION, max_tokens=24, **kw) for m, kw in asks])
    for a, b, (m, kw) in zip(alone, together, asks):
        assert b.choices[0].message.content == a.choices[0].message.content, m
        want, got = entries(a), entries(b)
        assert (got is None) == (want is None) == (not kw), m
        if want is not None:
            assert [e[0] for e in got] == [e[0] for e in want], m
            assert [e[1] for e in got] == pytest.approx([e[1] for e in want], abs=1e-4), m
            assert [len(e[2]) for e in got] == [kw.get("top_logprobs", 0)] * len(got), m


def steps_with_more_than(before: dict[str, float], after: dict[str, float], name: str, bound: int) -> float:
    """Decode steps between two /metrics snapshots whose histogram `name` observed a value above `bound`."""
    def above(m: dict[str, float]) -> float:
        return m[f"{name}_count"] - m[f'{name}_bucket{{le="{float(bound)}"}}']

    return above(after) - above(before)


# -------------------------------------------------------------------------------------------------
# refusals: queue full, key, bad input


def test_queue_full_is_429(zoo):
    with serve(config(zoo, max_batch=1, max_queue=1)) as (url, _):
        client = openai_client(url)
        results = concurrently([lambda: ask(client, "base", QUESTION, max_tokens=300) for _ in range(6)])
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        answered = [r for r in results if not isinstance(r, Exception)]
        assert len(refused) + len(answered) == 6, [r for r in results if isinstance(r, Exception)]
        assert refused and answered
        for e in refused:
            assert e.status_code == 429 and e.response.json()["error"]["code"] == "queue_full"
        assert all(r.usage.completion_tokens > 0 for r in answered)
        still_serves(client)  # the queue drains and the server answers again


def test_api_key_is_required_except_for_health(zoo):
    with serve(config(zoo, api_key="sekret")) as (url, _):
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{url}{path}", timeout=30).status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert_error(post(url, "/v1/chat/completions", body), 401)
        assert_error(post(url, "/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2}), 401)
        with pytest.raises(openai.AuthenticationError):
            ask(openai_client(url, api_key="wrong"), "base", "hi", max_tokens=2)
        good = openai_client(url, api_key="sekret")
        assert ask(good, "base", "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")
        assert metrics(url, Authorization="Bearer sekret")


def chat_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(kw)
    return body


@pytest.mark.parametrize("body,status,code", [
    (chat_body(temperature="hot"), 400, None),
    (chat_body(temperature=-1), 400, None),
    (chat_body(top_p=2), 400, None),
    (chat_body(messages="hello"), 400, None),
    (chat_body(messages=[{"role": "user", "content": 5}]), 400, None),
    (chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, None),
    (chat_body(messages=[]), 400, None),
    (chat_body(max_tokens="ten"), 400, None),
    (chat_body(max_tokens=0), 400, None),
    (chat_body(max_tokens=MAX_TOKENS + 1), 400, None),
    (chat_body(stop=12), 400, None),
    (chat_body(seed="x"), 400, None),
    (chat_body(stream={"on": 1}), 400, None),
    (chat_body(n=17), 400, None),
    (chat_body(temperature=3), 400, None),
    (chat_body(stop=["a", "b", "c", "d", "e"]), 400, None),
    (chat_body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]), 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, None),  # no model
    (chat_body(model="no-such-adapter"), 404, "model_not_found"),
    (chat_body(top_logprobs=2), 400, None),  # without logprobs: true
    (chat_body(logprobs=True, top_logprobs=21), 400, None),
])
def test_bad_chat_requests_get_their_4xx(url, client, body, status, code):
    assert_error(post(url, "/v1/chat/completions", body), status, code)
    still_serves(client)


def test_malformed_json_and_bad_completions_get_400(url, client):
    for content in (b'{"model": "v1", "messages": [', b"not json", b"[1, 2]", b""):
        assert_error(post(url, "/v1/chat/completions", content=content), 400)
        assert_error(post(url, "/v1/completions", content=content), 400)
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": 5, "max_tokens": 2}), 400)
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": "", "max_tokens": 2}), 400)
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": "a", "max_tokens": MAX_TOKENS + 1}), 400)
    assert_error(post(url, "/v1/completions", {"model": "nope", "prompt": "a", "max_tokens": 2}), 404,
                 "model_not_found")
    assert_error(post(url, "/v1/completions", {"model": "v1", "prompt": "a", "logprobs": 6}), 400)
    still_serves(client)


def test_prompt_longer_than_the_context_is_400(url, client, refs):
    tok = refs("base")[1]
    text = " ".join(str(i % 10) for i in range(2 * CONTEXT))
    assert len(tok.encode(text)) > CONTEXT
    assert_error(post(url, "/v1/chat/completions", chat_body(model="base", messages=[
        {"role": "user", "content": text}])), 400, "context_length_exceeded")
    assert_error(post(url, "/v1/completions", {"model": "base", "prompt": text, "max_tokens": 4}), 400,
                 "context_length_exceeded")
    with pytest.raises(openai.BadRequestError):
        ask(client, "v1", text, max_tokens=4)
    still_serves(client)


def test_body_over_the_limit_is_413(url, client):
    text = "x" * (LIMITS["max_body_bytes"] + 1000)
    assert_error(post(url, "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": text}])), 413)
    still_serves(client)


def test_no_request_above_ever_got_a_5xx(url):
    """Runs after the refusals: the server counted requests by status, and none was a 5xx."""
    counts = {k: v for k, v in metrics(url).items() if "status" in k}
    assert counts, "no per-status request counter in /metrics"
    assert not [k for k in counts if 'status="5' in k and counts[k] > 0], counts


# -------------------------------------------------------------------------------------------------
# disconnects and metrics


def test_client_disconnect_mid_stream_frees_its_slot(served, refs):
    url, server = served
    prompt = "count to three"
    n = 600
    # the greedy answer runs the whole n tokens (no EOS), so stopping early can only come from the disconnect
    assert chat_reference(refs, "v1", prompt, max_new_tokens=n).completion_tokens == n
    before = metrics(url)
    body = {"model": "v1", "messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
            "stream": True}
    # 10 ms a step at least: the n tokens take 6 s on any machine (a fast one finished all but 5 of them
    # before the hang-up was seen)
    with paced(server, 0.01):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line and '"content":""' not in line.replace(" ", ""):
                    break  # the first chunk with text: hang up
        deadline = time.monotonic() + 5
        while running(metrics(url)) > 0:
            assert time.monotonic() < deadline, "the disconnected stream still holds its slot after 5 s"
            time.sleep(0.05)
    generated = tokens_generated(metrics(url)) - tokens_generated(before)
    assert generated < n / 2, f"{generated} tokens generated for a client that left after the first chunk"


def running(m: dict[str, float]) -> float:
    return m["llama_adapter_running_sequences"]


def tokens_generated(m: dict[str, float]) -> float:
    return m["llama_adapter_generated_tokens_total"]


def test_metrics_are_prometheus_text(url, client):
    before = metrics(url)
    out = ask(client, "v1", QUESTION, max_tokens=5)
    after = metrics(url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    chat_ok = 'llama_adapter_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert delta(chat_ok) == 1
    assert after["llama_adapter_queue_length"] == 0 and running(after) == 0
    eos = 1 if out.choices[0].finish_reason == "stop" else 0
    assert tokens_generated(after) - tokens_generated(before) == out.usage.completion_tokens + eos
    assert delta("llama_adapter_time_to_first_token_seconds_count") == 1
    assert delta("llama_adapter_time_to_first_token_seconds_sum") > 0
    assert delta("llama_adapter_time_per_output_token_seconds_count") == out.usage.completion_tokens + eos - 1
    assert delta("llama_adapter_decode_batch_rows_count") >= 1
    # a refusal is counted under its status
    before = metrics(url)
    assert_error(post(url, "/v1/chat/completions", chat_body(model="nope")), 404)
    assert metrics(url)['llama_adapter_requests_total{endpoint="/v1/chat/completions",status="404"}'] == \
        before.get('llama_adapter_requests_total{endpoint="/v1/chat/completions",status="404"}', 0) + 1


# -------------------------------------------------------------------------------------------------
# the embedded SmolLM2 with a trained adapter


PAIRS = [("What colour is the sky?", "The sky is blue."), ("Say hello.", "Hello!"),
         ("What is two plus two?", "Two plus two is four."), ("Name a fruit.", "An apple.")]


def test_embedded_smollm2_with_a_trained_v1_adapter(tmp_path):
    from llama_adapter.data import encode_pair
    from llama_adapter.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model, tok = la.load_pretrained()
    la.attach(model, la.AdapterV1Config(prompt_len=10, n_layers=8))
    examples = [encode_pair(tok, tok.chat_prompt([{"role": "user", "content": p}]), r, 96, f"pair{i}",
                            add_special_tokens=False) for i, (p, r) in enumerate(PAIRS)]
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, lr=5e-2, warmup_steps=0,
                      progress=False, seed=0)
    Trainer(model, cfg, {"instruction": examples}, pad_id=tok.pad_id).fit()
    assert all(p.abs().max() > 0 for n, p in la.trainable_parameters(model).items() if n.endswith("gate"))
    la.save_adapter(model, tmp_path / "trained")
    model.eval()

    question = "What colour is grass?"
    ids = tok.encode(tok.chat_prompt([{"role": "user", "content": question}]), add_special_tokens=False)
    want = "".join(stream_ids(model, tok, ids, Sampling(max_new_tokens=12)))
    with serve(ServeConfig(model=DEFAULT_MODEL, adapters={"trained": str(tmp_path / "trained")},
                           max_batch=4, max_tokens=64, dtype="fp32")) as (url, _):
        client = openai_client(url)
        out = ask(client, "trained", question, max_tokens=12)
        base = ask(client, "base", question, max_tokens=12)
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(ids)
    assert base.choices[0].message.content != want  # the trained adapter changes the answer

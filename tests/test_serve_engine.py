"""The server's engine below HTTP: weight-sharing copies, continuous batching across adapters, prompt layouts,
image limits. The anchor everywhere is `la.generate` on the same model and prompt (greedy, fp32)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

import llama_adapter as la
from llama_adapter.model.fused import fuse_projections
from llama_adapter.model.share import weight_sharing_copy
from llama_adapter.serve.config import ServeConfig
from llama_adapter.serve.engine import DecodeBatch, Row, install_dispatchers, prefill, shares_base
from llama_adapter.serve.errors import APIError
from llama_adapter.serve.images import load_image
from llama_adapter.serve.prompts import PromptLayout, render_chat


def _acting(model, cfg, tok, seed):
    """`cfg` attached to `model` with its zero-initialised parts randomised, so that it changes the output."""
    la.attach(model, cfg, tokenizer=tok)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def base(tiny):
    model, tok = tiny
    fuse_projections(model)
    return model, tok


def test_a_weight_sharing_copy_shares_every_tensor_and_leaves_the_base_alone(base):
    model, tok = base
    copy = weight_sharing_copy(model)
    own = {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}  # V2 tunes them: the copy's
    for (name, a), b in zip(model.named_parameters(), copy.parameters()):
        assert (a.data_ptr() == b.data_ptr()) == (name not in own) and torch.equal(a, b), name
    before = la.generate(model, tok, "hello world", max_new_tokens=6)
    _acting(copy, la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 0)
    assert model.adapter is None and la.generate(model, tok, "hello world", max_new_tokens=6) == before
    assert la.generate(copy, tok, "hello world", max_new_tokens=6) != before
    with pytest.raises(ValueError, match="attached"):
        weight_sharing_copy(copy)


def _ids(tok, text):
    return tok.encode(tok.chat_prompt([{"role": "user", "content": text}]), add_special_tokens=False)


@torch.inference_mode()  # as the server's scheduler runs the batch
def _decode_together(batch, tok, jobs, n_new, join_every=4):
    """Greedy: each (model, text) job joins `batch` `join_every` steps after the one before; their texts, the most
    adapters one step served, and the most tokens one job decoded."""
    tokens: list[list[int]] = [[] for _ in jobs]
    waiting, step, adapters_seen = list(range(len(jobs))), 0, 0
    while waiting or batch.rows:
        if waiting and step % join_every == 0:
            i = waiting.pop(0)
            m, text = jobs[i]
            pre = prefill(m, tok, _ids(tok, text))
            first = int(pre.logits.argmax())
            tokens[i].append(first)
            batch.admit(Row(m, str(id(m)), pre.prefix, pre.state, pre.extras, pre.position, first, i), pre)
        if batch.rows:
            adapters_seen = max(adapters_seen, batch.adapters_in_step())
            logits = batch.step()
            done = []
            for j, row in enumerate(batch.rows):
                row.token = int(logits[j].argmax())
                tokens[row.owner].append(row.token)
                if len(tokens[row.owner]) >= n_new or row.token in tok.eos_ids:
                    done.append(j)
            batch.remove(done)
        step += 1
    texts = [tok.decode([t for t in ts if t not in tok.eos_ids]) for ts in tokens]
    return texts, adapters_seen, max(len(t) for t in tokens)


def test_rows_of_different_adapters_joining_at_different_times_decode_as_each_alone(base):
    """V1, LaVIN (text) and the bare base in one batch; rows join every few steps with prompts of different
    lengths (the buffer shifts right) and decode past its first 64 columns (it compacts or grows)."""
    model, tok = base
    v1 = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1)
    v1b = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=5, n_layers=3), tok, 2)
    lavin = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)
    plain = weight_sharing_copy(model)
    assert all(shares_base(m) for m in (v1, v1b, lavin, plain))
    jobs = [(v1, "hello"), (lavin, "what colour is the triangle? the triangle is green. the quick brown fox"),
            (plain, "a red circle"), (v1b, "the quick brown fox jumps over the lazy dog and more"), (v1, "yes no")]
    n_new = 70
    expected = [la.generate(m, tok, text, max_new_tokens=n_new, chat=True)[0] for m, text in jobs]
    batch = DecodeBatch(install_dispatchers(weight_sharing_copy(model)), shared=True)
    got, adapters_seen, longest = _decode_together(batch, tok, jobs, n_new)
    assert got == expected
    assert adapters_seen >= 3  # the rows really shared steps
    assert longest > 64 - len(_ids(tok, "hello"))  # decoded past the first buffer


def test_with_compile_a_lone_row_decodes_on_its_adapters_compiled_step(base, monkeypatch, tmp_path):
    """serve --compile: a lone sequence of one adapter decodes on that adapter's compiled step over the batch's
    buffers once its background compile is done, with the eager tokens; a second adapter joining sends the batch
    to the shared model's step (eager while its own graph compiles in the background)."""
    from llama_adapter.model.fastpath import compiled_decode_of

    model, tok = base
    v1 = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1)
    lavin = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)
    jobs = [(v1, "hello"), (lavin, "a red circle")]
    expected = [la.generate(m, tok, text, max_new_tokens=16, chat=True)[0] for m, text in jobs]  # eager (conftest)
    monkeypatch.setenv("LLAMA_ADAPTER_FAST_DECODE", "1")  # the default fast path, with an inductor cache of its own
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    batch = DecodeBatch(install_dispatchers(weight_sharing_copy(model)), shared=True, compiled=True)
    assert _decode_together(batch, tok, jobs[:1], 16)[0] == expected[:1]  # eager while the worker compiles
    state = compiled_decode_of(v1)
    assert state is not None and state.wait(300) and state.failed is None
    before = state.compiled_steps
    assert _decode_together(batch, tok, jobs[:1], 16)[0] == expected[:1]
    assert state.compiled_steps - before == 15  # every step after the prefill's token
    before = state.compiled_steps
    assert _decode_together(batch, tok, jobs, 16, join_every=3)[0] == expected
    assert 0 < state.compiled_steps - before < 15  # alone for its first 3 steps, in a mixed batch after them
    mixed = compiled_decode_of(batch.model)
    assert mixed is not None and mixed.wait(300) and mixed.failed is None  # the mixed batch's graph compiled


def test_with_compile_rows_of_one_adapter_decode_together_on_its_compiled_step(base, monkeypatch):
    """serve --compile: rows of one adapter joining at different times decode on that adapter's compiled step (a
    graph for a lone row, one for any larger batch, per buffer width), with the eager tokens. Compiled in process
    here (`enable_compiled_decode`), so that every step runs on a graph; the background compile is the lone-row
    test's."""
    model, tok = base
    lavin = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)
    jobs = [(lavin, "hello"), (lavin, "a red circle on a blue square"), (lavin, "yes no")]
    expected = [la.generate(m, tok, text, max_new_tokens=12, chat=True)[0] for m, text in jobs]  # eager (conftest)
    state = la.enable_compiled_decode(lavin)
    batch = DecodeBatch(install_dispatchers(weight_sharing_copy(model)), shared=True, compiled=True)
    rows = []
    step = batch.step
    monkeypatch.setattr(batch, "step", lambda: (rows.append(len(batch.rows)), step())[1])
    assert _decode_together(batch, tok, jobs, 12, join_every=2)[0] == expected
    assert state.failed is None and max(rows) == 3 and state.compiled_steps == len(rows)  # every step, 1-3 rows


def _mixed_steps(batch, monkeypatch) -> list[bool]:
    """Filled as `batch` steps: whether each step's rows were of several adapters."""
    mixed: list[bool] = []
    step = batch.step
    monkeypatch.setattr(batch, "step", lambda: (mixed.append(batch.adapters_in_step() > 1), step())[1])
    return mixed


def test_with_compile_rows_of_several_adapters_decode_together_on_the_shared_compiled_step(base, monkeypatch):
    """serve --compile: rows of V1 adapters with different prompt lengths and layers, LaVIN adapters of different
    ranks (one grouped) and the bare base decode together on the shared model's compiled step, the graph reading
    their merged per-row hooks (prompts padded and masked, a down-projection per row), with the eager tokens."""
    model, tok = base
    v1 = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1)
    v1b = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=5, n_layers=3), tok, 2)
    lavin = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)
    lavin_g = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=8, groups=4), tok, 4)
    plain = weight_sharing_copy(model)
    jobs = [(v1, "hello"), (lavin, "a red circle on a blue square"), (v1b, "yes no"), (lavin_g, "the quick fox"),
            (plain, "what colour is it"), (v1, "one two three")]
    expected = [la.generate(m, tok, text, max_new_tokens=10, chat=True)[0] for m, text in jobs]  # eager (conftest)
    shared = install_dispatchers(weight_sharing_copy(model))
    state = la.enable_compiled_decode(shared)
    batch = DecodeBatch(shared, shared=True, compiled=True)
    mixed = _mixed_steps(batch, monkeypatch)
    got, adapters_seen, _ = _decode_together(batch, tok, jobs, 10, join_every=2)
    assert got == expected
    assert state.failed is None and adapters_seen >= 4
    assert state.compiled_steps == sum(mixed) > 10  # every mixed step on the graph


def test_with_compile_one_mix_of_adapters_is_one_graph_pair_for_every_batch_size_and_buffer_width(base, monkeypatch):
    """Rows of a V1 and a LaVIN adapter join and leave (2-4 rows in the mixed steps) and decode past the buffer's
    first 64 columns (it grows): the blocks and the head are compiled once each."""
    model, tok = base
    v1 = _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1)
    lavin = _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)
    jobs = [(v1, "hello"), (lavin, "a red circle"), (v1, "yes no"), (lavin, "the quick brown fox")]
    shared = install_dispatchers(weight_sharing_copy(model))
    state = la.enable_compiled_decode(shared)
    torch._dynamo.reset()  # no graph of an earlier test for the same inputs
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    batch = DecodeBatch(shared, shared=True, compiled=True)
    mixed = _mixed_steps(batch, monkeypatch)
    _, adapters_seen, longest = _decode_together(batch, tok, jobs, 60, join_every=3)
    assert state.failed is None and adapters_seen == 2 and state.compiled_steps == sum(mixed) > 50
    assert longest + len(_ids(tok, "hello")) > 64  # past the first buffer width
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2


def test_rows_joining_grow_the_buffer_s_rows_not_its_width(base):
    """Every width is a shape of the compiled step's inputs: rows joining keep it (it grows with the columns)."""
    model, tok = base
    batch = DecodeBatch(install_dispatchers(weight_sharing_copy(model)), shared=True)
    for i in range(5):
        pre = prefill(model, tok, _ids(tok, "hello"))
        batch.admit(Row(model, "base", pre.prefix, pre.state, pre.extras, pre.position, 0, i), pre)
        rows, width = batch.capacity
        assert rows >= i + 1 and width == 64


def test_a_mixed_batch_runs_its_hooks_as_per_row_tensors_equal_to_each_adapters_own(base, monkeypatch):
    """Rows of V1 adapters with different prompt lengths and layers, LaVIN adapters of different ranks and the
    bare base: the merged per-row hooks (serve/merged.py) give the logits that calling each adapter's own hooks
    on its rows gives."""
    from llama_adapter.serve import engine

    model, tok = base
    models = [_acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1),
              _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=5, n_layers=3), tok, 2),
              _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3),
              _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=8, groups=4), tok, 4),
              weight_sharing_copy(model)]
    texts = ["hello", "the quick brown fox", "a red circle", "what colour is it", "yes no maybe"]

    def steps(merge: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(engine, "merge_hooks", engine.merge_hooks if merge else (lambda groups, n: None))
        batch = DecodeBatch(install_dispatchers(weight_sharing_copy(model)), shared=True)
        for i, (m, text) in enumerate(zip(models + models[:2], texts + texts[::-1][:2])):
            pre = prefill(m, tok, _ids(tok, text))
            batch.admit(Row(m, str(id(m)), pre.prefix, pre.state, pre.extras, pre.position,
                            int(pre.logits.argmax()), i), pre)
        out = []
        for _ in range(3):
            out.append(batch.step())
            assert (batch._row_groups()[1] is not None) == merge
            for j, row in enumerate(batch.rows):
                row.token = int(out[-1][j].argmax())
        return out

    merged, own = steps(True), steps(False)
    for a, b in zip(merged, own):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(own[0][0], own[0][-1])  # the rows really differ


def test_prompts_prefilled_together_decode_as_each_prefilled_alone(base):
    """One left-padded prefill of prompts of different lengths (plain, V1, LaVIN): each row's logits, position,
    prompt columns and hook state equal its own prefill's, and the rows decode as `la.generate` does."""
    from llama_adapter.serve.engine import prefill_many

    model, tok = base
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "a red circle"]
    for m in (weight_sharing_copy(model),
              _acting(weight_sharing_copy(model), la.AdapterV1Config(prompt_len=3, n_layers=2), tok, 1),
              _acting(weight_sharing_copy(model), la.LavinConfig(vision=None, rank=4), tok, 3)):
        together = prefill_many(m, tok, [_ids(tok, t) for t in texts])
        for text, pre in zip(texts, together):
            alone = prefill(m, tok, _ids(tok, text))
            torch.testing.assert_close(pre.logits, alone.logits, rtol=1e-4, atol=1e-4)
            assert (pre.position, pre.columns) == (alone.position, alone.k.shape[3]) and pre.k.shape[3] >= pre.columns
            assert pre.state.keys() == alone.state.keys()
            for key in alone.state:
                torch.testing.assert_close(pre.state[key], alone.state[key], rtol=1e-4, atol=1e-4)
        expected = [la.generate(m, tok, t, max_new_tokens=8, chat=True)[0] for t in texts]
        batch = DecodeBatch(m, shared=False)
        tokens: list[list[int]] = [[int(pre.logits.argmax())] for pre in together]
        with torch.inference_mode():
            for i, pre in enumerate(together):
                batch.admit(Row(m, "m", pre.prefix, pre.state, pre.extras, pre.position, tokens[i][0], i), pre)
            for _ in range(7):
                logits = batch.step()
                for j, row in enumerate(batch.rows):
                    row.token = int(logits[j].argmax())
                    tokens[row.owner].append(row.token)
        assert [tok.decode([t for t in ts if t not in tok.eos_ids]) for ts in tokens] == expected


def test_requests_arriving_together_are_prefilled_together_per_model():
    """Text prompts of one model together, shortest first, split where padding would more than double the work;
    a prompt with an image, or one whose prompt is scored (echo), alone."""
    from types import SimpleNamespace

    from llama_adapter.serve.scheduler import prefill_groups

    def job(name, n, image=None, echo=None):
        return SimpleNamespace(served=SimpleNamespace(name=name), prompt_ids=[0] * n, image=image, echo=echo)

    jobs = [job("v1", 10), job("base", 5), job("v1", 12), job("v1", 50), job("v1", 11, image="im"), job("base", 6),
            job("base", 7, echo="text")]
    groups = [[(j.served.name, len(j.prompt_ids)) for j in g] for g in prefill_groups(jobs)]
    assert sorted(groups) == sorted([[("v1", 11)], [("v1", 10), ("v1", 12)], [("v1", 50)],  # 3 x 50 > 2 x 72
                                     [("base", 5), ("base", 6)], [("base", 7)]])


def _saved(model, cfg, tok, folder, seed):
    m = _acting(weight_sharing_copy(model), cfg, tok, seed)
    la.save_adapter(m, folder)
    return m


def _all_at_once(server, tok, requests):
    """Submit (served name, text, image) requests to the server's scheduler together, before it starts; their
    answers (12 greedy tokens each)."""
    import asyncio

    from llama_adapter.generate import Sampling
    from llama_adapter.serve.scheduler import Job

    async def run(name, text, im):
        job = Job(server.served[name], _ids(tok, text), Sampling(max_new_tokens=12), im)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        server.scheduler.submit(job)
        out = ""
        while (event := await job.events.get())[0] == "text":
            out += event[1]
        return out

    async def gather():
        runs = [asyncio.create_task(run(*r)) for r in requests]
        await asyncio.sleep(0)  # every request is in the queue before the scheduler starts: admitted at once
        server.scheduler.start()
        return await asyncio.gather(*runs)

    try:
        return asyncio.run(gather())
    finally:
        server.scheduler.stop()


def test_the_server_loads_v2_folded_or_in_its_own_batch_and_images_reach_v1(base, tiny_folder, tmp_path,
                                                                          monkeypatch):

    from llama_adapter.serve import Server

    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, tok = base
    refs = {
        "v1": _saved(model, la.AdapterV1Config(prompt_len=3, n_layers=2), tok, tmp_path / "v1", 1),
        "v1mm": _saved(model, la.AdapterV1Config(prompt_len=3, n_layers=2, vision="efficientnet-lite0"), tok,
                       tmp_path / "v1mm", 2),
        "v2": _saved(model, la.AdapterV2Config(), tok, tmp_path / "v2", 3),
        "v2mm": _saved(model, la.AdapterV2Config(vision="efficientnet-lite0"), tok, tmp_path / "v2mm", 4),
    }
    server = Server.load(ServeConfig(model=str(tiny_folder), dtype="fp32",
                                     adapters={k: str(tmp_path / k) for k in refs}))
    s = server.served
    assert (s["v1"].batch, s["v1mm"].batch) == ("shared", "shared")
    assert (s["v2"].batch, s["v2"].folded) == ("v2", True)
    assert (s["v2mm"].batch, s["v2mm"].folded, s["v2mm"].images) == ("v2mm", False, True)
    # a V1 adapter costs its own weights only (no second copy of the norms it does not tune); one frozen image
    # encoder serves both image adapters; V2 tunes the norms, so its copy owns them and the base stays untouched
    own = sum(t.numel() * t.element_size() for n, t in [*refs["v1"].named_parameters(), *refs["v1"].named_buffers()]
              if ".prefix." in n)
    assert s["v1"].adapter_bytes == own
    assert s["v2mm"].adapter_bytes < s["v1mm"].adapter_bytes / 2
    norm = "layers.0.input_layernorm.weight"
    assert dict(s["v1"].model.named_parameters())[norm] is dict(server.base.named_parameters())[norm]
    assert dict(s["v2mm"].model.named_parameters())[norm] is not dict(server.base.named_parameters())[norm]
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    requests = [("v1", "hello", None), ("v1mm", "what colour", image), ("v2", "a red circle", None),
                ("v2mm", "what colour", image), ("v1mm", "hello", None), ("base", "yes", None),
                ("v1", "the quick brown fox", None)]
    got = _all_at_once(server, tok, requests)
    for (name, text, im), answer in zip(requests, got):
        m = refs.get(name, model)
        assert answer == la.generate(m, tok, text, images=None if im is None else [im], chat=True,
                                     max_new_tokens=12)[0], name
    # the two text requests to v1 arrived together: one prefill (the scheduler admits all seven at once)
    prefills = {s.name: s.value for s in server.metrics.prefill_rows.collect()[0].samples}
    assert prefills["llama_adapter_prefill_batch_rows_count"] == len(requests) - 1


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_base_serves_v1_shared_and_v2_unfolded(base, tiny_folder, tmp_path, kind):
    """Issue 38's `serve --quantize`: V1 shares the packed base's batch; V2 cannot be folded into packed weights,
    so it decodes unfolded in a batch of its own; each answers as `la.generate` on a quantized base with the
    adapter loaded."""

    from llama_adapter.model.quantize import quantization_of
    from llama_adapter.serve import Server

    model, tok = base
    _saved(model, la.AdapterV1Config(prompt_len=3, n_layers=2), tok, tmp_path / "v1", 1)
    _saved(model, la.AdapterV2Config(), tok, tmp_path / "v2", 3)
    server = Server.load(ServeConfig(model=str(tiny_folder), dtype="fp32", quantize=kind,
                                     adapters={k: str(tmp_path / k) for k in ("v1", "v2")}))
    s = server.served
    assert quantization_of(server.base) == kind
    assert s["v1"].batch == "shared" and (s["v2"].batch, s["v2"].folded) == ("v2", False)
    requests = [("v1", "hello", None), ("v2", "a red circle", None), ("base", "yes", None),
                ("v1", "the quick brown fox", None)]
    got = _all_at_once(server, tok, requests)
    for (name, text, _), answer in zip(requests, got):
        ref, _ = la.load_pretrained(tiny_folder, quantize=kind)
        if name != "base":
            la.load_adapter(ref, tmp_path / name, tokenizer=tok)
        assert answer == la.generate(ref, tok, text, chat=True, max_new_tokens=12)[0], name
    with pytest.raises(ValueError, match="int8, int4"):
        ServeConfig(quantize="int2")


def test_prompt_layouts(tiny):
    _, tok = tiny
    chat = [("user", "hello")]
    assert render_chat(tok, PromptLayout(), chat) == _ids(tok, "hello")
    alpaca = render_chat(tok, PromptLayout("alpaca"), [("system", "be brief"), ("user", "hello")], "OCR: 42")
    text = tok.decode(alpaca)
    assert "### Instruction:\nbe brief\n\nhello" in text and "### Input:\nOCR: 42" in text
    plain = tok.decode(render_chat(tok, PromptLayout("plain"), [("user", "hi"), ("assistant", "yes"),
                                                                  ("user", "one")]))
    assert plain.index("### Human: hi") < plain.index("yes") < plain.index("### Human: one")
    assert plain.endswith("### Assistant: ")
    tok.hf.chat_template = None  # a base without a chat template falls back to Alpaca: the experts' text once
    fallback = tok.decode(render_chat(tok, PromptLayout(), [("user", "hello")], "OCR: 42"))
    assert "### Instruction:\nhello\n\n" in fallback and fallback.count("OCR: 42") == 1


def _data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_urls_are_decoded_within_the_limits():
    cfg = ServeConfig(max_image_pixels=100 * 100)
    img = load_image(_data_url(Image.new("RGB", (20, 10), (1, 2, 3)), "JPEG"), cfg)
    assert img.size == (20, 10) and img.mode == "RGB"
    bad = {
        "not valid base64": "data:image/png;base64,@@@@",
        "not supported": "data:image/gif;base64,AAAA",
        "could not be decoded": "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        "more than the server's limit": _data_url(Image.new("RGB", (101, 100))),
        "only data: image URLs": "http://127.0.0.1/x.png",
    }
    for message, url in bad.items():
        with pytest.raises(APIError, match=message) as e:
            load_image(url, cfg)
        assert e.value.status == 400


def test_experts_read_a_request_image_for_a_text_only_model(tiny_folder, tmp_path):
    """With --expert ocr, an image sent to a text-only model reaches it as the OCR expert's text (as `generate
    --expert ocr` does); without experts the same request is a 400 naming the model."""
    from llama_adapter.data.synth import synthesize
    from llama_adapter.serve import Server
    from llama_adapter.serve.protocol import ChatRequest

    s = synthesize(tmp_path / "ocr", 2, seed=11, n_test=1, ocr_words=3)
    record = json.loads(s.ocr_train.read_text())[0]
    url = "data:image/png;base64," + base64.b64encode((s.out_dir / record["image"]).read_bytes()).decode()
    body = {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What does it say?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    with_ocr = Server.load(ServeConfig(model=str(tiny_folder), dtype="fp32", experts=["ocr"]))
    [job] = with_ocr.chat_jobs(ChatRequest.model_validate(body))
    tok = with_ocr.tok
    expected = render_chat(tok, PromptLayout(), [("user", "What does it say?")],
                           f"Text in the image: {record['answer']}")
    assert job.prompt_ids == expected and job.image is None
    plain = Server.load(ServeConfig(model=str(tiny_folder), dtype="fp32"))
    with pytest.raises(APIError, match="'base' takes no images") as e:
        plain.chat_jobs(ChatRequest.model_validate(body))
    assert e.value.status == 400

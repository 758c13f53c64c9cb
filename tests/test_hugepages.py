"""Frozen weights moved into a mapping advised for huge pages (model/hugepages.py): same values, same tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama_adapter as la
from llama_adapter.model import hugepages
from llama_adapter.model.fused import joint_of
from llama_adapter.model.hugepages import (
    ENV_SWITCH,
    frozen_cpu_tensors,
    huge_pages_available,
    mapping_fields,
    move_to_huge_pages,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_move_keeps_values_tensors_and_ties(tiny_folder, monkeypatch, quantize):
    monkeypatch.setenv(ENV_SWITCH, "0")  # load without moving, then move here
    model, _ = la.load_pretrained(tiny_folder, quantize=quantize)
    if quantize is None:
        model.lm_head.weight = model.embed_tokens.weight  # tied, as SmolLM2's table
    ids = torch.randint(3, 400, (2, 12))
    before = _logits(model, ids)
    tensors = frozen_cpu_tensors(model)
    ids_before = [id(t) for t in tensors]
    values = [t.clone() for t in tensors]
    pointers = [t.data_ptr() for t in tensors]
    arena = move_to_huge_pages(model)
    assert all(arena.holds(t) for t in tensors)
    assert [id(t) for t in frozen_cpu_tensors(model)] == ids_before
    for t, v, p in zip(tensors, values, pointers):
        assert torch.equal(t, v) and t.data_ptr() != p and t.data_ptr() % hugepages.ALIGN == 0
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)  # a storage each
    if quantize is None:
        assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(_logits(model, ids), before)


def test_trainable_tensors_stay_and_training_runs(tiny, tmp_path):
    model, _ = tiny
    la.attach(model, la.AdapterV1Config(prompt_len=4, n_layers=2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    pointers = [p.data_ptr() for p in trainable]
    move_to_huge_pages(model)
    assert [p.data_ptr() for p in trainable] == pointers
    ids = torch.randint(3, 400, (2, 12))
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_moved_weights_save_copy_and_reload(tiny, tmp_path):
    model, _ = tiny
    move_to_huge_pages(model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "w.safetensors"))  # separate storages: no shared-memory refusal
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    twin = copy.deepcopy(model)
    ids = torch.randint(3, 400, (1, 8))
    assert torch.equal(_logits(twin, ids), _logits(model, ids))


def test_switch_and_platform(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert not huge_pages_available()
    monkeypatch.setenv(ENV_SWITCH, "1")
    monkeypatch.setattr(hugepages, "THP_MODE", hugepages.THP_MODE.with_name("no-such-file"))
    assert not huge_pages_available()


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on request here")
def test_loader_moves_weights_into_an_advised_mapping(tiny_folder):
    """Every frozen weight, the joint q/k/v and gate/up ones included (made at load, not at the first call)."""
    model, tok = la.load_pretrained(tiny_folder)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    qkv, gate_up = joint_of([attn.q_proj, attn.k_proj, attn.v_proj]), joint_of([mlp.gate_proj, mlp.up_proj])
    assert qkv is not None and gate_up is not None
    for t in (model.embed_tokens.weight, attn.o_proj.weight, mlp.down_proj.weight, qkv.weight, gate_up.weight,
              model.norm.weight):
        assert "hg" in mapping_fields(t.data_ptr())["VmFlags"].split()  # madvise(MADV_HUGEPAGE) on the mapping
    pointers = [p.data_ptr() for p in model.parameters()]
    la.generate(model, tok, "hello", max_new_tokens=3)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # decoding keeps the loader's joint weights


@pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on request here")
def test_kernel_backs_the_mapping_with_huge_pages():
    """The point of the move: the kernel gives the advised mapping 2 MiB pages (it may fall back to small ones
    when memory is too fragmented to compact; then this fails and says so)."""
    layer = torch.nn.Linear(2048, 2048, bias=False).requires_grad_(False)  # 16 MiB
    move_to_huge_pages(layer)
    fields = mapping_fields(layer.weight.data_ptr())
    huge_kb = int(fields["AnonHugePages"].split()[0])
    assert huge_kb >= 8 * 1024, f"only {huge_kb} kB of the mapping on huge pages: {fields}"

"""The memory estimate of `llama-adapter params`: checked against the bytes autograd really saves on
a tiny model, and for what sharding and activation checkpointing change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llama_adapter as la
from llama_adapter.cli import main as cli_main
from llama_adapter.model.config import ModelConfig
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.memory import GIB, activation_bytes_per_token, estimate_memory, split_parameters

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def saved_activation_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward and loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    return sum(storages.values())


@pytest.mark.parametrize("method", [la.AdapterV1Config(prompt_len=4, n_layers=2),
                                    la.AdapterV2Config(prompt_len=4, n_layers=3)], ids=["v1", "v2"])
def test_activation_estimate_is_near_what_autograd_saves(tiny_folder, method):
    model, _ = la.load_pretrained(tiny_folder)
    la.attach(model, method)
    params = la.trainable_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    B, T = 2, 64
    measured = saved_activation_bytes(model, torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(0)))
    split = split_parameters(model, set(params))
    cfg = model.config
    est = estimate_memory(cfg, split, TrainConfig(batch_size=B, precision="fp32"), T).activations * GIB
    assert 0.75 < est / measured < 1.35, (est, measured)
    if isinstance(method, la.AdapterV1Config):
        assert split.layers_with_grad == 2  # V1's lower layers keep nothing
    per_layer = activation_bytes_per_token(cfg, 4, split.trains_inside_linears)
    assert per_layer > 0


def test_sharding_and_checkpointing_change_what_they_should():
    cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008)
    split_kw = dict(frozen_in_blocks=32 * 202_375_168, frozen_outside=2 * 32000 * 4096 + 4096, trainable=1_229_760,
                    largest_block=202_375_168, trains_inside_linears=False, layers_with_grad=30)
    from llama_adapter.train.memory import ParameterSplit

    split = ParameterSplit(**split_kw)
    train = TrainConfig(batch_size=4, precision="bf16", base_dtype="bf16")
    none = estimate_memory(cfg, split, train, 512)
    fsdp = estimate_memory(cfg, split, train, 512, devices=8, shard="fsdp")
    assert none.frozen_weights == pytest.approx((32 * 202_375_168 + split.frozen_outside) * 2 / GIB)
    shard_and_gathered = 32 * 202_375_168 / 8 + 2 * 202_375_168
    assert fsdp.frozen_weights == pytest.approx((shard_and_gathered + split.frozen_outside) * 2 / GIB)
    assert fsdp.activations == none.activations and fsdp.optimizer_state == none.optimizer_state
    ckpt = estimate_memory(cfg, split, TrainConfig(batch_size=4, precision="bf16", base_dtype="bf16",
                                                   activation_checkpointing=True), 512)
    assert ckpt.activations < none.activations / 3
    assert none.optimizer_state == pytest.approx(2 * 1_229_760 * 4 / GIB)
    with pytest.raises(ValueError, match="shard"):
        estimate_memory(cfg, split, train, 512, shard="zero3")


def test_params_prints_the_estimate_for_both_options(capsys):
    assert cli_main(["params", "--recipe", str(RECIPES / "v1_llama7b_alpaca.yaml"), "--devices", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == 1_229_760
    mem = out["memory_estimate"]
    assert mem["seq_len"] == 512 and mem["batch_size"] == 4
    none, fsdp = mem["per_device_gib"]["shard none"], mem["per_device_gib"]["shard fsdp x 4 devices"]
    assert 12 < none["frozen_weights"] < 14  # 6.7B parameters in bf16
    assert fsdp["frozen_weights"] < none["frozen_weights"] / 2
    assert none["total"] == pytest.approx(sum(v for k, v in none.items() if k != "total"), abs=0.01)

"""The reference releases load into the right modules and give the logits of their own forward pass.

Fixtures are written here from the format descriptions (names and shapes scaled down) on a tiny
Meta-layout LLaMA; the reference forward is interop_reference.meta_forward (Meta layout, complex
rotary), so wq/wk layout handling of biases and LoRA factors is checked too."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CORPUS
from interop_reference import FFN, PARAMS, meta_forward, meta_state, train_sentencepiece, write_meta_folder
from PIL import Image
from torch import nn

import llama_adapter as la
from llama_adapter import interop
from llama_adapter.methods.lavin import MODALITY_INDEX

pytest.importorskip("sentencepiece")
C, H, N = PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_layers"]
KV = C // H * PARAMS["n_kv_heads"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    folder = root / "llama-tiny"
    folder.mkdir()
    vocab = train_sentencepiece(folder, CORPUS)
    sd = meta_state(vocab, seed=5)
    write_meta_folder(folder, sd, CORPUS)
    return folder, sd, root / "cache"


@pytest.fixture
def base(meta, monkeypatch):
    folder, sd, cache = meta
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(cache))
    model, tok = la.load_pretrained(folder)
    ids = torch.tensor([tok.encode("a red circle and a blue square")])
    return model, tok, sd, ids


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def v1_release(n_adapted: int = 2, k: int = 10, dim: int = C, heads: int = H, layers: int = N) -> dict:
    state = {"adapter_query.weight": torch.randn(n_adapted * k, dim, generator=g(1))}
    for i in range(layers):
        adapted = i >= layers - n_adapted
        state[f"layers.{i}.attention.gate"] = torch.randn(1, heads, 1, 1, generator=g(10 + i)) * adapted
    return state


def test_v1_release_matches_its_forward(base, tmp_path):
    model, _, sd, ids = base
    state = v1_release()
    torch.save(state, tmp_path / "llama_adapter_len10_layer2.pth")
    assert interop.detect_format(tmp_path / "llama_adapter_len10_layer2.pth") == "v1-release"
    interop.load_adapter(model, tmp_path / "llama_adapter_len10_layer2.pth")
    q = state["adapter_query.weight"]
    prompts = {1: (q[:10], state["layers.1.attention.gate"].flatten()),
               2: (q[10:], state["layers.2.attention.gate"].flatten())}
    torch.testing.assert_close(model.layers[2].self_attn.prefix.prompt.detach(), q[10:])
    with torch.no_grad():
        got = model(ids)
    want = meta_forward(sd, ids, prompts=prompts)
    assert (want - meta_forward(sd, ids)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def v2_release(rank: int = 4, visual: bool = True) -> dict:
    k = 10
    s: dict[str, torch.Tensor] = {"adapter_query.weight": torch.randn(2 * k, C, generator=g(2))}
    sizes = {"wq": (C, C), "wk": (KV, C), "wv": (KV, C), "wo": (C, C), "w1": (FFN, C), "w2": (C, FFN), "w3": (FFN, C)}
    for i in range(N):
        a, f = f"llama.layers.{i}.attention", f"llama.layers.{i}.feed_forward"
        s[f"{a}.gate"] = torch.randn(1, H, 1, 1, generator=g(20 + i))
        s[f"{a}.new_gate"] = torch.ones(1, H, 1, 1)
        for lin in ("wq", "wo"):
            s[f"{a}.{lin}.bias"] = 0.1 * torch.randn(sizes[lin][0], generator=g(30 + i))
        for lin in ("w1", "w2", "w3"):
            s[f"{f}.{lin}.bias"] = 0.1 * torch.randn(sizes[lin][0], generator=g(40 + i))
        s[f"llama.layers.{i}.attention_norm.weight"] = 1 + 0.2 * torch.randn(C, generator=g(50 + i))
        s[f"llama.layers.{i}.ffn_norm.weight"] = 1 + 0.2 * torch.randn(C, generator=g(60 + i))
        for lin, (out_f, in_f) in sizes.items():
            where = a if lin.startswith("w") and lin in ("wq", "wk", "wv", "wo") else f
            s[f"{where}.lora_{lin}_l1.weight"] = torch.randn(rank, in_f, generator=g(70 + i)) / in_f ** 0.5
            s[f"{where}.lora_{lin}_l2.weight"] = 0.1 * torch.randn(out_f, rank, generator=g(80 + i))
    s["llama.norm.weight"] = 1 + 0.2 * torch.randn(C, generator=g(90))
    if visual:
        w = 16  # CLIP ViT-L/14's 768, scaled down
        s.update({"clip_proj.weight": torch.randn(w, w), "clip_proj.bias": torch.zeros(w),
                  "clip_proj_norm.weight": torch.ones(w), "clip_proj_norm.bias": torch.zeros(w),
                  "visual_query.weight": torch.randn(10, w), "visual_blocks.0.attn.qkv.weight": torch.randn(3 * w, w),
                  "visual_proj.weight": torch.randn(C, w), "visual_proj_norm.weight": torch.ones(C)})
    return {"model": s, "config": {"w_bias": True, "w_lora": True, "lora_rank": rank}}


def v2_reference(sd: dict, release: dict, ids: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
    """The release's forward on one example; `visual` [K, C]: its visual tokens, added to every adapted prompt."""
    s = release["model"]
    merged = dict(sd)
    lora = {}
    for key, t in s.items():
        if not key.startswith("llama."):
            continue
        name = key.removeprefix("llama.")
        if name.endswith((".bias", "norm.weight")):
            merged[name] = t
        elif "_l1." in name:
            layer, lin = name.split(".")[1], name.split("lora_")[1].split("_l1")[0]
            part = "attention" if lin in ("wq", "wk", "wv", "wo") else "feed_forward"
            lora[f"layers.{layer}.{part}.{lin}"] = (t, s[key.replace("_l1.", "_l2.")])
    q = s["adapter_query.weight"]
    extra = 0 if visual is None else visual
    prompts = {1: (q[:10] + extra, s["llama.layers.1.attention.gate"].flatten()),
               2: (q[10:] + extra, s["llama.layers.2.attention.gate"].flatten())}
    return meta_forward(merged, ids, prompts=prompts, lora=lora)


def test_v2_release_text_path_matches_its_forward(base, tmp_path):
    model, _, sd, ids = base
    release = v2_release()
    path = tmp_path / "7fa55208379faf2dd862565284101b0e4a2a72114d6490f95e432cf9d9b6c813_BIAS-7B.pth"
    torch.save(release, path)
    assert interop.detect_format(path) == "v2-release"
    with pytest.raises(ValueError, match=r"cannot load clip_proj.bias, clip_proj.weight.*skip_visual=True"):
        interop.load_adapter(model, path)
    assert model.adapter is None  # refused before anything was attached
    with pytest.warns(UserWarning, match="dropped 8 visual tensors"):
        interop.load_adapter(model, path, skip_visual=True)
    cfg = model.adapter.config
    assert (cfg.n_layers, cfg.prompt_len, cfg.lora_rank, cfg.lora_alpha, cfg.vision) == (2, 10, 4, 4.0, None)
    with torch.no_grad():
        got = model(ids)
    want = v2_reference(sd, release, ids)
    assert (want - meta_forward(sd, ids)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_v2_release_new_gate_other_than_one_is_refused(base, tmp_path):
    model, *_ = base
    release = v2_release(visual=False)
    release["model"]["llama.layers.2.attention.new_gate"] = torch.full((1, H, 1, 1), 0.5)
    torch.save(release, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"llama.layers.2.attention.new_gate: new_gate differs"):
        interop.load_adapter(model, tmp_path / "v2.pth")


def release_adapter(a: str, width: int, rank: int, groups: int, seed: int, stride: int) -> dict:
    """One of LaVIN's release adapters named `a` (conv_A down, grouped conv_B/conv_D up, the router), each tensor
    from its own seed: seed + k * stride for the k-th, a conv's bias at its weight's seed + stride / 2."""
    seeds = [seed + k * stride for k in range(6)]
    s = {f"{a}.conv_A.weight": torch.randn(rank, width, 1, generator=g(seeds[0])) / width ** 0.5,
         f"{a}.conv_A.bias": 0.1 * torch.randn(rank, generator=g(seeds[1]))}
    for conv, at in (("conv_B", seeds[2]), ("conv_D", seeds[3])):
        s[f"{a}.{conv}.weight"] = 0.3 * torch.randn(width, rank // groups, 1, generator=g(at))
        s[f"{a}.{conv}.bias"] = 0.1 * torch.randn(width, generator=g(at + stride // 2))
    s[f"{a}.expert_weights.weight"] = torch.randn(2, width, generator=g(seeds[4]))
    s[f"{a}.expert_weights.bias"] = torch.randn(2, generator=g(seeds[5]))
    return s


def lavin_checkpoint(rank: int = 8, groups: int = 2, module_prefix: bool = True, ffn: bool = False) -> dict:
    pre = "module." if module_prefix else ""
    s: dict[str, torch.Tensor] = {f"{pre}adapter_modality_embedding.weight": torch.randn(2, C, generator=g(3))}
    slots = ("adapter_attn", "adapter_mlp") if ffn else ("adapter_attn",)
    for i in range(N):
        for slot in slots:
            s.update(release_adapter(f"{pre}layers.{i}.{slot}", C, rank, groups, seed=100 + i, stride=10))
    s[f"{pre}backbone.visual.transformer.resblocks.0.adapter_attn.conv_A.weight"] = torch.randn(rank, 16, 1)
    s[f"{pre}adapter_proj.conv_A.weight"] = torch.randn(128, 16, 1)
    return {"model": s, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]},
            "epoch": 19, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(temperature=5.0, max_seq_len=512)}


class ConvAdapter(nn.Module):
    """LaVIN's MM-adapter as the checkpoint describes it: conv1d down (k=1), two grouped conv1d ups mixed by
    softmax(router(modality token state) / tau); the reference against which our GroupedUp mapping is checked."""

    def __init__(self, s: dict, prefix: str, groups: int, tau: float):
        super().__init__()
        self.s, self.p, self.groups, self.tau = s, prefix, groups, tau

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        s, p = self.s, self.p
        t = h[torch.arange(h.shape[0]), ctx.extras[MODALITY_INDEX]]
        w = torch.softmax(F.linear(t, s[p + "expert_weights.weight"], s[p + "expert_weights.bias"]) / self.tau, -1)
        z = F.conv1d(h.transpose(1, 2), s[p + "conv_A.weight"], s[p + "conv_A.bias"])
        b = F.conv1d(z, s[p + "conv_B.weight"], s[p + "conv_B.bias"], groups=self.groups)
        d = F.conv1d(z, s[p + "conv_D.weight"], s[p + "conv_D.bias"], groups=self.groups)
        return h + (w[:, 0, None, None] * b + w[:, 1, None, None] * d).transpose(1, 2)


def lavin_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pb = model.adapter.prepare_inputs(model, ids, None, None)
    with torch.no_grad():
        return model(inputs_embeds=pb.inputs_embeds, attention_mask=pb.attention_mask, extras=pb.extras)


@pytest.mark.parametrize("module_prefix", [True, False])
def test_lavin_checkpoint_matches_conv_reference(base, meta, tmp_path, module_prefix):
    model, tok, _, ids = base
    ckpt = lavin_checkpoint(module_prefix=module_prefix)
    torch.save(ckpt, tmp_path / "checkpoint-19.pth")
    assert interop.detect_format(tmp_path / "checkpoint-19.pth") == "lavin"
    with pytest.raises(ValueError, match=r"backbone.visual.transformer.resblocks.0.adapter_attn.conv_A.weight"):
        interop.load_adapter(model, tmp_path / "checkpoint-19.pth", tokenizer=tok)
    with pytest.warns(UserWarning, match="text-only LaVIN"):
        interop.load_adapter(model, tmp_path / "checkpoint-19.pth", tokenizer=tok, skip_visual=True)
    assert model.adapter.config.temperature == 5.0 and model.adapter.config.vision is None
    got = lavin_logits(model, ids)

    ref, _ = la.load_pretrained(meta[0])
    la.attach(ref, la.LavinConfig(rank=8, groups=2, temperature=5.0, vision=None), tokenizer=tok)
    s = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    with torch.no_grad():
        ref.lavin.modality.weight.copy_(s["adapter_modality_embedding.weight"])
    for i, layer in enumerate(ref.layers):
        layer.attn_adapter = ConvAdapter(s, f"layers.{i}.adapter_attn.", groups=2, tau=5.0)
    want = lavin_logits(ref, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for layer in ref.layers:
        layer.attn_adapter = None
    assert (lavin_logits(ref, ids) - want).abs().max() > 1e-2  # the adapters matter: the comparison means something


def test_lavin_ffn_adapters_map_to_ffn_slot(base, tmp_path):
    model, tok, _, _ = base
    torch.save(lavin_checkpoint(ffn=True), tmp_path / "checkpoint-3.pth")
    with pytest.warns(UserWarning):
        interop.load_adapter(model, tmp_path / "checkpoint-3.pth", tokenizer=tok, skip_visual=True)
    assert model.adapter.config.ffn_adapter
    want = lavin_checkpoint(ffn=True)["model"]["module.layers.1.adapter_mlp.conv_D.weight"][..., 0]
    torch.testing.assert_close(model.layers[1].ffn_adapter.up1.weight.detach().reshape(C, -1), want)


def test_our_own_folder_still_loads_through_interop(base, tmp_path):
    model, _, _, ids = base
    la.attach(model, la.AdapterV1Config(prompt_len=3, n_layers=2))
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.normal_()
    interop.save_adapter(model, tmp_path / "ours")
    assert interop.detect_format(tmp_path / "ours") == "ours"
    fresh, _ = la.load_pretrained(base[0].name_or_path)
    interop.load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids))


# -- the visual sides, on a tiny random CLIP (CLIP ViT-L/14 scaled down, saved with its visual projection) --
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2, image_size=32,
           patch_size=8, projection_dim=24)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT))
    with torch.no_grad():  # non-trivial norms, so that a missed layer norm shows
        for name, p in tower.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    tower.save_pretrained(str(folder))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
    return folder, {k: v.detach().clone() for k, v in tower.state_dict().items()}, image, pixels


def release_projector(token_dim: int, width: int = 32, blocks: int = 2, queries: int = 10) -> dict:
    """The V2 release's visual tensors (768 wide, 8 blocks in the release; scaled down)."""
    def w(seed: int, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g(seed)) / shape[-1] ** 0.5

    s = {"clip_proj.weight": w(300, width, token_dim), "clip_proj.bias": 0.1 * w(301, width),
         "clip_proj_norm.weight": 1 + 0.2 * w(302, width), "clip_proj_norm.bias": 0.1 * w(303, width),
         "visual_query.weight": torch.randn(queries, width, generator=g(304)),
         "visual_proj.weight": w(305, C, width), "visual_proj.bias": 0.1 * w(306, C),
         "visual_proj_norm.weight": 1 + 0.2 * w(307, C), "visual_proj_norm.bias": 0.1 * w(308, C)}
    for i in range(blocks):
        b = f"visual_blocks.{i}."
        for j, (name, shape) in enumerate({"norm1": (width,), "norm2": (width,), "attn.qkv": (3 * width, width),
                                           "attn.proj": (width, width), "mlp.fc1": (4 * width, width),
                                           "mlp.fc2": (width, 4 * width)}.items()):
            s[b + name + ".weight"] = (1 + 0.2 * w(310 + 10 * i + j, *shape)) if "norm" in name else w(
                310 + 10 * i + j, *shape)
            s[b + name + ".bias"] = 0.1 * w(400 + 10 * i + j, shape[0])
    return s


def test_v2_release_visual_side_matches_its_forward(base, clip, tmp_path):
    from interop_reference import clip_hidden_states, layer_norm, release_visual_tokens

    model, _, sd, ids = base
    folder, clip_sd, image, pixels = clip
    release = v2_release(visual=False)
    release["model"].update(release_projector(token_dim=VIT["projection_dim"]))
    torch.save(release, tmp_path / "LORA-BIAS-7B.pth")
    with pytest.raises(ValueError, match=r"cannot load clip_proj.bias.*vision='clip:<folder>'.*skip_visual=True"):
        interop.load_adapter(model, tmp_path / "LORA-BIAS-7B.pth")
    with pytest.warns(UserWarning, match=r"every adapted layer.*all_layers.*release.*not the paper's early fusion"):
        interop.load_adapter(model, tmp_path / "LORA-BIAS-7B.pth", vision=f"clip:{folder}")
    cfg = model.adapter.config
    assert (cfg.visual_fusion, cfg.visual_projector, cfg.visual_blocks, cfg.visual_width, cfg.visual_heads) == \
        ("all_layers", "release", 2, 32, 16)
    assert all(layer.self_attn.prefix is None for layer in model.layers[:1])  # no early visual prefix

    # The release: CLIP's post-layernorm tokens ([CLS] included) through its visual projection, then its projector.
    states = clip_hidden_states(clip_sd, pixels, VIT["num_attention_heads"], VIT["patch_size"])
    clip_tokens = layer_norm(states[-1], clip_sd, "vision_model.post_layernorm") @ clip_sd["visual_projection.weight"].T
    visual = release_visual_tokens(release["model"], clip_tokens, n_heads=16)
    with torch.no_grad():
        pb = model.adapter.prepare_inputs(model, ids, None, [image])
        torch.testing.assert_close(pb.extras["visual_tokens"], visual, atol=1e-5, rtol=1e-4)
        got = model(pb.input_ids, extras=pb.extras)
        text_only = model.adapter.prepare_inputs(model, ids, None, [None])
        got_text = model(text_only.input_ids, extras=text_only.extras)
    want = v2_reference(sd, release, ids, visual[0])
    assert (want - v2_reference(sd, release, ids)).abs().max() > 1e-2  # the image matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_text, v2_reference(sd, release, ids), atol=1e-4, rtol=1e-4)

    la.save_adapter(model, tmp_path / "ours")  # the compatibility options survive our own format
    fresh, _ = la.load_pretrained(model.name_or_path)
    la.load_adapter(fresh, tmp_path / "ours")
    assert fresh.adapter.config.visual_fusion == "all_layers"
    with torch.no_grad():
        pb = fresh.adapter.prepare_inputs(fresh, ids, None, [image])
        torch.testing.assert_close(fresh(pb.input_ids, extras=pb.extras), got)


def test_v2_compatibility_options_are_checked(base, clip):
    model, *_ = base
    with pytest.raises(ValueError, match="visual_queries must equal prompt_len"):
        la.AdapterV2Config(vision="efficientnet-lite0", visual_fusion="all_layers", visual_queries=4, prompt_len=10)
    with pytest.raises(ValueError, match="visual_fusion must be one of early, all_layers"):
        la.AdapterV2Config(visual_fusion="late")
    with pytest.raises(ValueError, match="projected tokens need a CLIP folder"):
        la.AdapterV2Config(vision="efficientnet-lite0", visual_projector="release", visual_fusion="all_layers")
    la.attach(model, la.AdapterV2Config(vision=str(clip[0]), visual_projector="release", visual_fusion="all_layers",
                                        visual_blocks=1, visual_heads=4, n_layers=2))  # a bare CLIP folder is one
    assert model.visual.frontend.encoder.token_dim == VIT["projection_dim"]
    assert model.visual.frontend.encoder.n_tokens == (32 // 8) ** 2 + 1  # [CLS] included


def test_v2_release_visual_needs_a_clip_with_projection(base, clip, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model, *_ = base
    folder = clip[0]
    plain = tmp_path / "plain-clip"
    CLIPVisionModel(CLIPVisionConfig(**VIT)).save_pretrained(str(plain))
    (plain / "preprocessor_config.json").write_text((folder / "preprocessor_config.json").read_text())
    release = v2_release(visual=False)
    release["model"].update(release_projector(token_dim=VIT["projection_dim"]))
    torch.save(release, tmp_path / "BIAS-7B.pth")
    with pytest.raises(ValueError, match=r"no visual_projection.weight"):
        interop.load_adapter(model, tmp_path / "BIAS-7B.pth", vision=f"clip:{plain}")
    assert model.adapter is None
    release["model"]["clip_proj.weight"] = torch.randn(32, 20)  # made for another CLIP width
    torch.save(release, tmp_path / "BIAS-7B.pth")
    with pytest.raises(ValueError, match=r"clip_proj.weight has shape \(32, 20\).*\(32, 24\)"):
        interop.load_adapter(model, tmp_path / "BIAS-7B.pth", vision=f"clip:{folder}")


def lavin_visual(width: int = VIT["hidden_size"], blocks: int = VIT["num_hidden_layers"], rank: int = 8,
                 groups: int = 2, hidden: int = 16) -> dict:
    """LaVIN's visual tensors (CLIP ViT-L/14: 24 blocks of width 1024, neck hidden 128; scaled down)."""
    s: dict[str, torch.Tensor] = {}
    for j in range(blocks):
        s.update(release_adapter(f"module.backbone.visual.transformer.resblocks.{j}.adapter_attn", width, rank,
                                 groups, seed=500 + j, stride=30))
    s["module.adapter_proj.conv_A.weight"] = torch.randn(hidden, width, generator=g(680)) / width ** 0.5
    s["module.adapter_proj.conv_A.bias"] = 0.1 * torch.randn(hidden, generator=g(681))
    s["module.adapter_proj.conv_B.weight"] = torch.randn(C, hidden, generator=g(682)) / hidden ** 0.5
    s["module.adapter_proj.conv_B.bias"] = 0.1 * torch.randn(C, generator=g(683))
    return s


def test_lavin_visual_side_matches_its_forward(base, meta, clip, tmp_path):
    from interop_reference import lavin_visual_tokens

    model, tok, _, ids = base
    folder, clip_sd, image, pixels = clip
    ckpt = lavin_checkpoint()
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "backbone." not in k and "adapter_proj." not in k}
    ckpt["model"].update(lavin_visual())
    torch.save(ckpt, tmp_path / "checkpoint-19.pth")
    with pytest.raises(ValueError, match=r"backbone.visual.*vision='clip:<folder>'"):
        interop.load_adapter(model, tmp_path / "checkpoint-19.pth", tokenizer=tok)
    with pytest.warns(UserWarning, match=r"adapter_proj neck .* own \[CLS\]"):
        interop.load_adapter(model, tmp_path / "checkpoint-19.pth", tokenizer=tok, vision=f"clip:{folder}")
    cfg = model.adapter.config
    assert (cfg.vision, cfg.vision_adapters, cfg.neck_hidden) == (f"clip:{folder}", True, 16)

    s = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    taps = model.lavin.frontend.encoder.layers
    assert taps == [4, 8]  # every fourth block, as LaVIN's six of 24
    visual = lavin_visual_tokens(s, clip_sd, pixels, VIT["num_attention_heads"], VIT["patch_size"], groups=2,
                                 tau=5.0, taps=taps)
    with torch.no_grad():
        ours, has = model.lavin.visual(model, [image], 1)
        torch.testing.assert_close(ours, visual, atol=1e-5, rtol=1e-4)
        pb = model.adapter.prepare_inputs(model, ids, None, [image])
        got = model(inputs_embeds=pb.inputs_embeds, attention_mask=pb.attention_mask, extras=pb.extras)

    # LaVIN's sequence: [modality 1] [BOS] "Image:" [visual tokens] [the rest], the modality token attended by none,
    # through the checkpoint's conv adapters routed by its state.
    ref, _ = la.load_pretrained(meta[0])
    la.attach(ref, la.LavinConfig(rank=8, groups=2, temperature=5.0, vision=None), tokenizer=tok)
    for i, layer in enumerate(ref.layers):
        layer.attn_adapter = ConvAdapter(s, f"layers.{i}.adapter_attn.", groups=2, tau=5.0)
    bos = tok.encode("", add_special_tokens=True)
    assert len(bos) == 1 and int(ids[0, 0]) == bos[0]
    emb = ref.embed_tokens.weight.detach()
    prefix = emb[torch.tensor(tok.encode("Image:", add_special_tokens=False))]
    seq = torch.cat([s["adapter_modality_embedding.weight"][1:2], emb[ids[0, :1]], prefix, visual[0], emb[ids[0, 1:]]])
    mask = torch.ones(1, seq.shape[0], dtype=torch.long)
    mask[0, 0] = 0
    with torch.no_grad():
        want = ref(inputs_embeds=seq[None], attention_mask=mask, extras={MODALITY_INDEX: torch.tensor([0])})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the ViT adapters matter: without them the visual tokens differ
        for module in model.lavin.frontend.encoder.adapters().values():
            module.up0.weight.zero_()
            module.up1.weight.zero_()
        assert (model.lavin.visual(model, [image], 1)[0] - visual).abs().max() > 1e-3


def test_cli_generate_loads_a_reference_pth(base, meta, tmp_path, capsys):
    from llama_adapter.cli import main

    model, tok, _, _ = base
    torch.save(v1_release(), tmp_path / "adapter.pth")
    args = ["generate", "--adapter", str(tmp_path / "adapter.pth"), "--prompt", "a red circle", "--no-chat",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(args) == 2  # a release names no base model
    assert "does not name its base model: give it with --model" in capsys.readouterr().err
    assert main([*args, "--model", str(meta[0])]) == 0
    interop.load_adapter(model, tmp_path / "adapter.pth")
    want = la.generate(model, tok, ["a red circle"], max_new_tokens=4)[0]
    assert capsys.readouterr().out == want + "\n"
    fresh, _ = la.load_pretrained(meta[0])
    assert la.generate(fresh, tok, ["a red circle"], max_new_tokens=4)[0] != want  # the adapter was loaded

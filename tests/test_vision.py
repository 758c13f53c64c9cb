"""Vision: image loading, encoders (tiny random CLIP/SigLIP, the real EfficientNet-Lite0), cache, projectors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llama_adapter.vision import (
    CLIPEncoder,
    EfficientNetLite0Encoder,
    FeatureCache,
    GlobalMLPProjector,
    LavinNeck,
    SiglipEncoder,
    VisionFeatures,
    VisualQueryProjector,
    blank_image,
    default_vit_layers,
    grid_position_embedding,
    image_digest,
    load_encoder,
    load_image,
)

MILITARY_UNIFORM = 652


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_load_image_formats(tmp_path, fmt, ext):
    path = _save(Image.new("RGB", (12, 9), (200, 30, 40)), tmp_path / f"a.{ext}", format=fmt,
                 **({"lossless": True} if fmt == "WEBP" else {}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 9)
    tol = 12 if fmt in ("JPEG", "GIF") else 0
    assert np.abs(np.asarray(img, dtype=int) - [200, 30, 40]).max() <= tol
    assert load_image(path.read_bytes()).size == (12, 9)


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    img = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert img.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white
    assert img.getpixel((0, 0)) == (10, 20, 30)
    assert load_image(_save(Image.new("LA", (3, 3), (0, 0)), tmp_path / "la.png")).getpixel((0, 0)) == (255,) * 3
    assert load_image(_save(Image.new("L", (3, 3), 77), tmp_path / "l.png")).getpixel((2, 2)) == (77,) * 3

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    img = load_image(_save(pal, tmp_path / "pal.png", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((3, 3)) == (0, 128, 255)

    deep = Image.fromarray(np.full((3, 5), 65535, dtype=np.uint16))
    img = load_image(_save(deep, tmp_path / "deep.png"))
    assert img.size == (5, 3) and img.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped noise
    half = load_image(_save(Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16)), tmp_path / "half.png"))
    assert half.getpixel((0, 0)) == (128, 128, 128)

    cmyk = load_image(_save(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    r, g, b = cmyk.getpixel((1, 1))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # pure red


def test_load_image_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 2
    r, g, b = load_image(path).getpixel((3, 3))
    assert r > 200 and b < 50


@pytest.mark.parametrize("orientation", [6, 8])
def test_load_image_exif_orientation(tmp_path, orientation):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[:20].mean(), np.asarray(out)[20:].mean()
    # 6 = rotate 90 clockwise to display (left half goes on top), 8 = counter-clockwise (goes to the bottom)
    assert (top > bottom) == (orientation == 6)


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        load_image(bad)
    truncated = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        image_digest(missing)


def test_digest_and_blank(tmp_path):
    p = _save(Image.new("RGB", (5, 5), (1, 2, 3)), tmp_path / "x.png")
    assert image_digest(p) == image_digest(p.read_bytes()) and len(image_digest(p)) == 64
    g = blank_image(16)
    assert g.size == (16, 16) and g.mode == "RGB" and set(np.asarray(g).ravel()) == {128}
    assert blank_image((8, 4)).size == (8, 4)


# ---------------------------------------------------------------------------------------
# tiny random CLIP / SigLIP
# ---------------------------------------------------------------------------------------

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
           patch_size=8)


def _save_vit(folder: Path, family: str) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    if family == "clip":
        from transformers import CLIPImageProcessor as Proc

        model, proc = CLIPVisionModel(CLIPVisionConfig(**VIT)), Proc(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32})
    else:
        from transformers import SiglipImageProcessor as Proc

        model, proc = SiglipVisionModel(SiglipVisionConfig(**VIT)), Proc(size={"height": 32, "width": 32})
    with torch.no_grad():  # non-trivial norms so that layer norms matter in the checks
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(folder))
    proc.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    return {fam: _save_vit(root / fam, fam) for fam in ("clip", "siglip")}


def _pictures(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_default_vit_layers():
    assert default_vit_layers(24) == [4, 8, 12, 16, 20, 24]
    assert default_vit_layers(4) == [4]
    assert default_vit_layers(10) == [2, 6, 10]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vit_encoder_matches_transformers(vit_folders, family):
    from transformers import CLIPVisionModel, SiglipVisionModel

    folder = vit_folders[family]
    enc = load_encoder(f"{family}:{folder}", layers=[1, 2, 4])
    assert isinstance(enc, CLIPEncoder if family == "clip" else SiglipEncoder)
    assert enc.global_dims == [32, 32, 32] and enc.token_dim == 32 and enc.n_tokens == 16 and enc.image_size == 32
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training and not enc.model.training

    pixels = enc.preprocess(_pictures())
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    feats = enc(pixels)
    assert [tuple(g.shape) for g in feats.globals] == [(2, 32)] * 3 and feats.tokens.shape == (2, 16, 32)

    ref = (CLIPVisionModel if family == "clip" else SiglipVisionModel).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
    for g, i in zip(feats.globals, [1, 2, 4]):
        want = out.hidden_states[i][:, 0] if family == "clip" else out.hidden_states[i].mean(1)
        torch.testing.assert_close(g, want)
    if family == "clip":
        torch.testing.assert_close(feats.globals[-1], out.last_hidden_state[:, 0])
        torch.testing.assert_close(feats.tokens, ref.post_layernorm(out.last_hidden_state)[:, 1:])
        torch.testing.assert_close(ref.post_layernorm(feats.globals[-1]), out.pooler_output)
    else:
        torch.testing.assert_close(feats.tokens, out.last_hidden_state)
    # A bare folder is recognised from config.json; default taps = every fourth from the last.
    bare = load_encoder(str(folder))
    assert type(bare) is type(enc) and bare.layers == [4]
    assert bare.fingerprint() != enc.fingerprint()  # taps are part of the fingerprint


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vit_pre_attention_adapter(vit_folders, family):
    enc = load_encoder(str(vit_folders[family]), layers=[2, 4])
    pixels = enc.preprocess(_pictures())
    base = enc(pixels)
    fp = enc.fingerprint()

    enc.set_pre_attention_adapter(1, torch.nn.Identity())
    same = enc(pixels)
    torch.testing.assert_close(same.tokens, base.tokens, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(same.globals, base.globals))

    seen = []
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 32)
    enc.set_pre_attention_adapter(2, lin)
    enc.blocks[2].pre_attention_adapter.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    changed = enc(pixels)
    assert seen == [(2, 17 if family == "clip" else 16, 32)]  # [B, N (+CLS), D]
    torch.testing.assert_close(changed.globals[0], base.globals[0])  # tap 2 = output of blocks 0-1 ...
    assert not torch.allclose(changed.tokens, base.tokens, atol=1e-3)  # ... but everything from block 2 on moves
    assert not torch.allclose(changed.globals[1], base.globals[1], atol=1e-3)
    assert "model.encoder.layers.2.pre_attention_adapter.weight" in dict(enc.named_parameters())
    assert enc.has_trainable() and enc.fingerprint() == fp  # the frozen weights did not change

    assert not lin.training  # follows the encoder, which is in eval mode by default
    changed.tokens.sum().backward()  # gradients reach the adapter through the frozen encoder
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    enc.train()
    assert lin.training and not enc.model.training and not enc.blocks[0].training

    enc.set_pre_attention_adapter(2, None)
    enc.set_pre_attention_adapter(1, None)
    assert not enc.has_trainable()
    torch.testing.assert_close(enc(pixels).tokens, base.tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        enc.set_pre_attention_adapter(4, torch.nn.Identity())


def test_load_encoder_errors(tmp_path, vit_folders):
    with pytest.raises(ValueError, match="unknown image encoder 'resnet50'"):
        load_encoder("resnet50")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_encoder(f"clip:{tmp_path / 'missing_dir'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(f"siglip:{tmp_path / 'empty'}")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_encoder(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match=r"1\.\.4"):
        load_encoder(str(vit_folders["clip"]), layers=[0, 5])
    with pytest.raises(ValueError, match="holds a clip model, not siglip"):
        load_encoder(f"siglip:{vit_folders['clip']}")


def test_clip_from_full_checkpoint(tmp_path, vit_folders):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=VIT, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(str(tmp_path / "full"))
    (tmp_path / "full" / "preprocessor_config.json").write_bytes(
        (vit_folders["clip"] / "preprocessor_config.json").read_bytes())
    enc = load_encoder(str(tmp_path / "full"), layers=[3])
    assert isinstance(enc, CLIPEncoder)
    pixels = enc.preprocess(_pictures(1))
    with torch.no_grad():
        want = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[3][:, 0]
        torch.testing.assert_close(enc(pixels).globals[0], want)


# ---------------------------------------------------------------------------------------
# EfficientNet-Lite0 (the real, embedded model)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return load_encoder("efficientnet-lite0")


def test_efficientnet_shapes(effnet):
    assert isinstance(effnet, EfficientNetLite0Encoder)
    assert effnet.global_dims == [40, 112, 320, 1280] and effnet.token_dim == 1752 and effnet.n_tokens == 49
    assert sum(p.numel() for p in effnet.parameters()) == 4_652_008
    pixels = effnet.preprocess([blank_image((300, 200)), _pictures(1)[0]])
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.allclose(pixels[0], torch.full_like(pixels[0], (128 - 127) / 128))
    with torch.no_grad():
        feats = effnet(pixels)
        ref_map = effnet.net.extract_features(pixels)
        ref_logits = effnet.net(pixels)
    assert [tuple(g.shape) for g in feats.globals] == [(2, 40), (2, 112), (2, 320), (2, 1280)]
    assert feats.tokens.shape == (2, 49, 1752)
    torch.testing.assert_close(feats.tokens[..., -1280:], ref_map.flatten(2).transpose(1, 2))
    # Every cell holds all four maps pooled to 7x7, so each slice averages back to its global.
    slices = torch.split(feats.tokens, effnet.global_dims, dim=-1)
    for g, cells in zip(feats.globals, slices):
        torch.testing.assert_close(cells.mean(1), g, rtol=1e-4, atol=1e-5)
    assert slices[0].std(1).mean() > 0.1 * slices[0].abs().mean()  # the stride-8 slice varies over the grid
    torch.testing.assert_close(effnet.net._fc(feats.globals[-1]), ref_logits)
    with pytest.raises(ValueError, match="not a vision transformer"):
        effnet.set_pre_attention_adapter(0, torch.nn.Identity())
    with pytest.raises(ValueError, match="224"):
        effnet(torch.zeros(1, 3, 64, 64))
    effnet.train()
    assert not effnet.net.training  # batch-norm statistics stay frozen
    effnet.eval()


def test_efficientnet_sees_grace_hopper(effnet):
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with torch.no_grad():
        logits = effnet.classify([path])
        blank = effnet.classify([blank_image()])
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] == MILITARY_UNIFORM, top5  # measured: 652 military uniform, p = 0.41
    assert logits.softmax(-1)[0, MILITARY_UNIFORM] > 0.25
    assert blank.softmax(-1)[0, MILITARY_UNIFORM] < 0.05  # a grey square is not a uniform


# ---------------------------------------------------------------------------------------
# feature cache
# ---------------------------------------------------------------------------------------


def _image_files(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(img, folder / f"img{i}.png") for i, img in enumerate(_pictures(n))]


def _count_forward(enc) -> list[int]:
    calls = [0]
    enc.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + a[0].shape[0]))
    return calls


def test_feature_cache(tmp_path, vit_folders):
    enc = load_encoder(str(vit_folders["clip"]), layers=[2, 4])
    calls = _count_forward(enc)
    paths = _image_files(tmp_path / "imgs")
    cache = FeatureCache(tmp_path / "cache", enc)
    first = cache.get(paths + [paths[0]])  # a repeated image is encoded once
    assert calls[0] == 3 and cache.misses == 3 and len(first) == 4
    files = sorted((tmp_path / "cache" / enc.fingerprint()).glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(image_digest(p) for p in paths)
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    again = FeatureCache(tmp_path / "cache", enc).get(paths)  # a later epoch: all from disk
    assert calls[0] == 3
    for a, b in zip(again.globals + [again.tokens], first[:3].globals + [first[:3].tokens]):
        assert torch.equal(a, b)
    with torch.no_grad():
        direct = enc.encode(paths)
    torch.testing.assert_close(again.tokens, direct.tokens)

    other = load_encoder(str(vit_folders["clip"]), layers=[4])
    assert other.fingerprint() != enc.fingerprint()
    other_calls = _count_forward(other)
    FeatureCache(tmp_path / "cache", other).get(paths[:1])
    assert other_calls[0] == 1 and (tmp_path / "cache" / other.fingerprint()).is_dir()

    files[0].write_bytes(b"garbage, not safetensors")
    victim = next(p for p in paths if image_digest(p) == files[0].stem)
    c3 = FeatureCache(tmp_path / "cache", enc)
    before = calls[0]
    healed = c3.get([victim])
    assert calls[0] == before + 1 and c3.misses == 1
    assert torch.equal(healed.tokens, first.tokens[paths.index(victim)][None])
    c3.get([victim])
    assert calls[0] == before + 1 and c3.hits == 1  # the corrupt file was overwritten

    enc.set_pre_attention_adapter(0, torch.nn.Identity())
    with pytest.raises(ValueError, match="cannot be cached"):
        FeatureCache(tmp_path / "cache", enc)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        c3.get([tmp_path / "gone.png"])


def test_vision_features_roundtrip():
    f = VisionFeatures([torch.randn(3, 4), torch.randn(3, 5)], torch.randn(3, 2, 6))
    parts = f.split()
    assert len(parts) == 3 and parts[1].tokens.shape == (1, 2, 6)
    back = VisionFeatures.cat(parts)
    assert torch.equal(back.tokens, f.tokens) and torch.equal(back.globals[1], f.globals[1])
    assert torch.equal(VisionFeatures.from_state_dict(f.state_dict()).globals[0], f.globals[0])
    assert f.to(torch.float64).tokens.dtype == torch.float64 and f[-1].tokens.shape[0] == 1
    with pytest.raises(ValueError, match="inconsistent"):
        VisionFeatures([torch.randn(2, 4)], torch.randn(3, 2, 6))


# ---------------------------------------------------------------------------------------
# projectors
# ---------------------------------------------------------------------------------------


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_projector_shapes():
    feats = VisionFeatures([torch.randn(2, 40), torch.randn(2, 112), torch.randn(2, 1280)], torch.randn(2, 49, 64))
    mlp = GlobalMLPProjector([40, 112, 1280], 96, hidden=32)
    assert mlp(feats).shape == (2, 96)
    with pytest.raises(ValueError, match="widths"):
        mlp(feats.globals[:2])
    vq = VisualQueryProjector(64, 96, n_queries=10, n_blocks=2)
    out = vq(feats)
    assert out.shape == (2, 10, 96)
    out.sum().backward()
    assert vq.queries.grad is not None and vq.queries.grad.abs().sum() > 0
    assert VisualQueryProjector(1280, 96, n_queries=4, width=64)(torch.randn(3, 49, 1280)).shape == (3, 4, 96)
    with pytest.raises(ValueError, match="divisible"):
        VisualQueryProjector(64, 96, n_heads=3)
    neck = LavinNeck([32] * 3, 48)
    assert neck([torch.randn(2, 32)] * 3).shape == (2, 3, 48)
    mixed = LavinNeck([40, 112, 40], 48, hidden=16)
    assert mixed(feats.globals[:1] + [feats.globals[1], torch.randn(2, 40)]).shape == (2, 3, 48)
    assert _n_params(mixed) == (40 * 16 + 16) + (112 * 16 + 16) + (16 * 48 + 48)


def test_query_projector_knows_where_each_cell_is():
    emb = grid_position_embedding(49, 64)
    assert emb.shape == (49, 64) and emb.abs().max() <= 1.0
    dists = torch.cdist(emb, emb) + torch.eye(49) * 1e3
    assert dists.min() > 0.5  # every cell has its own code
    row_part, col_part = emb[:, :32], emb[:, 32:]
    assert torch.equal(row_part[0], row_part[6]) and not torch.equal(row_part[0], row_part[7])  # same row
    assert torch.equal(col_part[0], col_part[7]) and not torch.equal(col_part[0], col_part[1])  # same column
    torch.manual_seed(0)
    vq = VisualQueryProjector(16, 24, n_queries=3, n_blocks=1).eval()
    grid = torch.randn(1, 49, 16)
    mirrored = grid.view(1, 7, 7, 16).flip(2).reshape(1, 49, 16)  # the same cells, left and right swapped
    assert (vq(grid) - vq(mirrored)).abs().max() > 1e-3


def test_lavin_neck_paper_count_and_meta():
    with torch.device("meta"):
        neck = LavinNeck([1024] * 6, 4096)
        mlp = GlobalMLPProjector([1024] * 6, 4096)
        vq = VisualQueryProjector(768, 4096, n_queries=10, n_blocks=8)
    assert _n_params(neck) == 659_584
    assert all(p.is_meta for m in (neck, mlp, vq) for p in m.parameters())
    assert _n_params(mlp) == 2 * 6 * 1024 + 6 * 1024 * 256 + 256 + 256 * 4096 + 4096
    # V2 release layout: clip_proj(+norm), 10 queries, 8 blocks of width 768, visual_proj(+norm) to 4096
    block = 2 * 768 * 2 + (768 * 3 * 768 + 3 * 768) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
    assert _n_params(vq) == (768 * 768 + 768 + 2 * 768) + 10 * 768 + 8 * block + (768 * 4096 + 4096 + 2 * 4096)


def test_running_moments_equal_the_statistics_of_all_rows_seen():
    from llama_adapter.vision.standardize import FeatureStandardizer

    torch.manual_seed(0)
    std = FeatureStandardizer([3, 5], token_dim=4).train()
    seen = [VisionFeatures([torch.randn(n, 3) * 4 + 2, torch.randn(n, 5)], torch.randn(n, 6, 4) + 1) for n in (1, 3, 7)]
    for f in seen:
        std(f)
    g0 = torch.cat([f.globals[0] for f in seen]).double()
    tok = torch.cat([f.tokens.flatten(0, 1) for f in seen]).double()
    assert std.globals[0].count.item() == 11 and std.tokens.count.item() == 66
    assert torch.allclose(std.globals[0].mean, g0.mean(0)) and torch.allclose(std.tokens.mean, tok.mean(0))
    assert torch.allclose(std.globals[0].m2 / 10, g0.var(0)) and torch.allclose(std.tokens.m2 / 65, tok.var(0))
    g1 = torch.cat([f.globals[1] for f in seen])
    out = std.eval()(VisionFeatures([g0.float(), g1], tok.float().view(11, 6, 4)))
    assert torch.allclose(out.globals[0].mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.globals[0].std(0), torch.ones(3), atol=1e-3)
    assert std.globals[0].count.item() == 11  # eval mode: frozen

"""LaVIN (Mixture-of-Modality Adaptation) on a tiny random language model and a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama_adapter as la
from llama_adapter.cli import main as cli_main
from llama_adapter.data.multimodal import MultimodalExample, collate_multimodal
from llama_adapter.data.tokenize import IGNORE, Example
from llama_adapter.generate import Sampling, generate_tokens, stream_batch
from llama_adapter.methods.lavin import MODALITY_INDEX, LavinConfig, MMAdapter, set_tokenizer
from llama_adapter.train import TrainConfig, Trainer
from llama_adapter.vision import load_encoder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
           patch_size=8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**VIT))
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    root, rng = tmp_path_factory.mktemp("pics"), np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(root / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def lavin_model(folder, clip_folder, **kw):
    model, tok = la.load_pretrained(folder)
    la.attach(model, LavinConfig(vision=f"clip:{clip_folder}", **kw), tokenizer=tok)
    return model, tok


def perturb(model, std: float = 0.3, seed: int = 0) -> None:
    """Trained-looking adapters: non-zero up-projections, distinct routers and modality embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in la.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def prompts(tok, texts=("what colour is the shape?", "hello world")):
    from llama_adapter.generate import left_pad

    return left_pad([tok.encode(t) for t in texts], tok.pad_id, torch.device("cpu"))


def forward(model, prep, **kw):
    return model(inputs_embeds=prep.inputs_embeds, attention_mask=prep.attention_mask, extras=prep.extras, **kw)


# ---------------------------------------------------------------------------------------


def test_parameter_counts_and_config_checks():
    with torch.device("meta"):
        assert sum(p.numel() for p in MMAdapter(4096, rank=8).parameters()) == 81_930
        assert sum(p.numel() for p in MMAdapter(1024, rank=8).parameters()) == 20_490
    for bad in (dict(rank=7), dict(temperature=0), dict(dropout=1.0), dict(neck_hidden=0), dict(vision=" ")):
        with pytest.raises(ValueError):
            LavinConfig(**bad)


def test_7b_recipe_counts_3781296(capsys):
    assert cli_main(["params", "--recipe", str(RECIPES / "lavin_llama7b_scienceqa.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lavin" and out["trainable"] == 3_781_296
    with torch.device("meta"):  # the shape preset counts; it refuses to see images
        enc = load_encoder("shape:clip-vit-l-14")
    with pytest.raises(ValueError, match="random-init"):
        enc(torch.zeros(1, 3, 224, 224, device="meta"))


def test_identity_at_init_text_and_image(tiny_folder, clip_folder, pictures):
    base, tok = la.load_pretrained(tiny_folder)
    model, _ = lavin_model(tiny_folder, clip_folder)
    ids, mask = prompts(tok)
    with torch.no_grad():
        for images in ([pictures[0], None], None):
            prep = model.adapter.prepare_inputs(model, ids, mask, images)
            want = base(inputs_embeds=prep.inputs_embeds, attention_mask=prep.attention_mask)
            torch.testing.assert_close(forward(model, prep), want, rtol=0, atol=1e-5)
        # identity ViT adapters leave the encoder's features unchanged
        enc = model.lavin.frontend.encoder
        assert len(enc.adapters()) == 4
        pixels = enc.preprocess([Image.open(p).convert("RGB") for p in pictures])
        plain = load_encoder(f"clip:{clip_folder}")(pixels)
        got = enc(pixels)
    for a, b in zip(got.globals, plain.globals):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_layout_labels_and_training_equals_inference(tiny_folder, clip_folder, pictures):
    model, tok = lavin_model(tiny_folder, clip_folder)
    perturb(model)
    prompt, answer = tok.encode("what colour is it?"), tok.encode(" red", add_special_tokens=False) + [2]
    ex = MultimodalExample(prompt + answer, [IGNORE] * len(prompt) + answer, pictures[0], "t")
    hello = tok.encode("hello world")
    text = Example(hello + answer, [IGNORE] * len(hello) + answer, "u", kind="vqa")
    batch = collate_multimodal([ex, text], tok.pad_id)
    inputs, labels = model.adapter.prepare_batch(model, batch)
    embeds, mask, index = inputs["inputs_embeds"], inputs["attention_mask"], inputs["extras"][MODALITY_INDEX]
    prefix, no_image = tok.encode("Image:", add_special_tokens=False), tok.encode("N/A", add_special_tokens=False)
    assert model.lavin.frontend.encoder.layers == [4]  # one tap of the tiny CLIP: one visual token
    lengths = [1 + len(prefix) + 1 + len(ex.input_ids), 1 + len(prefix) + len(no_image) + len(text.input_ids)]
    assert mask.sum(1).tolist() == [n - 1 for n in lengths] and index.tolist() == [0, 0]
    assert (mask[:, 0] == 0).all() and labels[:, : 1 + len(prefix) + 1].eq(IGNORE).all()
    with torch.no_grad():  # every label sits at the embedding of its own token
        at = labels != IGNORE
        torch.testing.assert_close(embeds[at], model.embed_tokens(labels[at]))
        torch.testing.assert_close(embeds[1, 1 + len(prefix): 1 + len(prefix) + len(no_image)],
                                   model.embed_tokens(torch.tensor(no_image)))
        # the prompt prepared for generation is laid out and positioned exactly as in training
        ids, pmask = prompts(tok, ("what colour is it?", "hello world and more words"))
        prep = model.adapter.prepare_inputs(model, ids, pmask, [pictures[0], None])
        n = 1 + len(prefix) + 1 + len(prompt)
        torch.testing.assert_close(prep.inputs_embeds[0, -n:], embeds[0, :n])
        train_logits = model(**inputs)[0, :n]
        torch.testing.assert_close(forward(model, prep)[0, -n:], train_logits, rtol=0, atol=1e-5)
    # a tokenizer that adds BOS itself: the BOS stays first after the modality token
    bos_tok = type("BosTok", (), {"encode": lambda self, t, add_special_tokens=True:
                                  ([1] if add_special_tokens else []) + tok.encode(t, add_special_tokens=False)})()
    set_tokenizer(model, bos_tok)
    one = torch.tensor([[1] + tok.encode("hi")])
    with torch.no_grad():
        prep = model.adapter.prepare_inputs(model, one, torch.ones_like(one), None)
    torch.testing.assert_close(prep.inputs_embeds[0, 1], model.embed_tokens.weight[1])


def test_modality_token_is_invisible_but_routes(tiny_folder, clip_folder, pictures):
    model, tok = lavin_model(tiny_folder, clip_folder)
    ids, mask = prompts(tok)
    images = [pictures[0], None]
    emb = model.lavin.modality.weight

    def outputs():
        with torch.no_grad():
            prep = model.adapter.prepare_inputs(model, ids, mask, images)
            keep = prep.attention_mask.bool()
            return forward(model, prep)[keep]

    before = outputs()
    with torch.no_grad():
        emb.add_(torch.randn_like(emb))
    torch.testing.assert_close(outputs(), before, rtol=0, atol=0)  # identity adapters: nothing sees it
    perturb(model)
    before = outputs()
    with torch.no_grad():
        emb.add_(torch.randn_like(emb))
    assert not torch.allclose(outputs(), before, atol=1e-4)  # through the routing only


def test_routing_by_modality_and_vit_routing_per_example(tiny_folder, clip_folder, pictures):
    model, tok = lavin_model(tiny_folder, clip_folder, dropout=0.0)
    perturb(model)
    ids, mask = prompts(tok, ("what colour is it?", "what colour is it?"))
    with torch.no_grad():
        prep = model.adapter.prepare_inputs(model, ids, mask, [pictures[0], None])
        cache = model.new_cache(2, prep.length)
        forward(model, prep, cache=cache)
    for i in range(len(model.layers)):
        w = cache.state[(i, "attn")]
        assert w.shape == (2, 2) and torch.allclose(w.sum(-1), torch.ones(2))
        assert not torch.allclose(w[0], w[1], atol=1e-4)  # image vs text-only

    enc = model.lavin.frontend.encoder
    seen: list[torch.Tensor] = []
    adapter = enc.adapters()[2]
    orig = adapter.routing
    adapter.routing = lambda t: seen.append(orig(t)) or seen[-1]
    with torch.no_grad():
        enc.encode([pictures[0], pictures[1]])
        enc.encode([pictures[1]])
        enc.encode([pictures[2], pictures[1], pictures[0]])
    pair, alone, three = seen
    assert not torch.allclose(pair[0], pair[1], atol=1e-5)  # each example routes on its own [CLS]
    torch.testing.assert_close(alone[0], pair[1])
    torch.testing.assert_close(three[1], pair[1])
    torch.testing.assert_close(three[2], pair[0])


@pytest.mark.parametrize("ffn_adapter", [False, True])
def test_cached_decoding_equals_full_forward(tiny_folder, clip_folder, pictures, ffn_adapter):
    model, tok = lavin_model(tiny_folder, clip_folder, ffn_adapter=ffn_adapter)
    perturb(model)
    ids, mask = prompts(tok)
    for images in ([pictures[0], None], [None, pictures[1]], None):
        with torch.no_grad():
            prep = model.adapter.prepare_inputs(model, ids, mask, images)
            steps = 5
            cache = model.new_cache(2, prep.length + steps)
            logits = forward(model, prep, cache=cache)[:, -1]
            embeds, m, generated = prep.inputs_embeds, prep.attention_mask, []
            for _ in range(steps):
                token = logits.argmax(-1)
                generated.append(token)
                embeds = torch.cat([embeds, model.embed_tokens(token)[:, None]], dim=1)
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
                logits = model(token[:, None], attention_mask=m, cache=cache, extras=prep.extras)[:, -1]
                full = model(inputs_embeds=embeds, attention_mask=m, extras=prep.extras)[:, -1]
                torch.testing.assert_close(logits, full, rtol=0, atol=1e-4)
        # the library's generation loop (its own positions and key mask) gives the same tokens
        lists = [p[mk.bool()].tolist() for p, mk in zip(ids, mask)]
        got = list(generate_tokens(model, tok, lists, Sampling(max_new_tokens=steps), images))
        eos = torch.tensor(sorted(tok.eos_ids))
        for row in range(2):
            want = torch.stack(generated)[:, row]
            stop = next((i for i, t in enumerate(want.tolist()) if t in eos.tolist()), steps - 1)
            assert torch.stack(got)[: stop + 1, row].tolist() == want[: stop + 1].tolist()


def test_training_moves_every_trainable_and_nothing_else(tiny_folder, clip_folder, pictures, tmp_path):
    model, tok = lavin_model(tiny_folder, clip_folder)
    answer = tok.encode(" red circle", add_special_tokens=False) + [2]
    examples = []
    for i, text in enumerate(["what colour is it?", "what shape is it?", "hello world", "how are you today?"]):
        p = tok.encode(text)
        image = pictures[i] if i < 2 else None
        examples.append(MultimodalExample(p + answer, [IGNORE] * len(p) + answer, image, f"r{i}"))
    params = la.trainable_parameters(model)
    assert any(".pre_attention_adapter." in n for n in params) and "lavin.modality.weight" in params
    assert la.count_trainable(model) == sum(p.numel() for p in params.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=1e-2, progress=False)
    trainer = Trainer(model, cfg, {"vqa": examples}, collate_fn=lambda ex: collate_multimodal(ex, tok.pad_id))
    batch = trainer.collate(examples)
    assert batch.kind == "vqa" and batch.has_image.tolist() == [True, True, False, False]
    trainer.fit()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(params)


def test_save_load_round_trip_and_refusals(tiny_folder, clip_folder, pictures, tmp_path):
    model, tok = lavin_model(tiny_folder, clip_folder)
    perturb(model)
    la.save_adapter(model, tmp_path / "ad")
    model2, tok2 = la.load_pretrained(tiny_folder)
    with pytest.raises(ValueError, match="tokenizer=tok"):  # LaVIN encodes "Image:" with it: given, never guessed
        la.load_adapter(model2, tmp_path / "ad")
    assert model2.adapter is None
    la.load_adapter(model2, tmp_path / "ad", tokenizer=tok2)
    texts = ["what shape is it?", "hello world"]
    a = la.generate(model, tok, texts, images=[pictures[0], None], max_new_tokens=6)
    assert a == la.generate(model2, tok, texts, images=[pictures[0], None], max_new_tokens=6)
    with pytest.raises(ValueError, match="modality token"):
        model(torch.tensor([tok.encode("hi")]))
    text_only, _ = la.load_pretrained(tiny_folder)
    la.attach(text_only, LavinConfig(vision=None), tokenizer=tok)
    # the attached method answers what a caller may give it: its modality token needs inputs prepared, and
    # only the LaVIN with vision takes images
    assert (model.adapter.takes_images, model.adapter.prepares_inputs, model.adapter.plain) == (True, True, False)
    assert (text_only.adapter.takes_images, text_only.adapter.prepares_inputs) == (False, True)
    assert la.count_trainable(text_only) == 4 * (64 * 8 + 8 + 2 * (64 * 4 + 64) + 64 * 2 + 2) + 2 * 64
    with pytest.raises(ValueError, match="without vision"):
        la.generate(text_only, tok, ["hi"], images=[pictures[0]])
    assert len(la.generate(text_only, tok, ["hi"], max_new_tokens=2)) == 1


def test_efficientnet_default_has_no_encoder_adapters_and_caches(tiny_folder, pictures, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_ADAPTER_CACHE", str(tmp_path / "cache"))
    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, LavinConfig(), tokenizer=tok)  # efficientnet-lite0: a CNN, so vision_adapters has nothing to adapt
    enc = model.lavin.frontend.encoder
    assert enc.adapters() == {} and not enc.has_trainable()
    assert not any(n.startswith("lavin.frontend") for n in la.trainable_parameters(model))
    ids, mask = prompts(tok)
    with torch.no_grad():
        prep = model.adapter.prepare_inputs(model, ids, mask, [pictures[0], None])
    prefix = tok.encode("Image:", add_special_tokens=False)
    start = prep.length - int(mask[0].sum()) - 4  # four taps (three stages and the head): four visual tokens
    torch.testing.assert_close(prep.inputs_embeds[0, start - len(prefix): start],
                               model.embed_tokens(torch.tensor(prefix)))
    assert model.lavin.frontend._cache is not None and model.lavin.frontend._cache.misses == 1


def test_attach_without_a_tokenizer_is_a_clear_error(tiny_folder):
    model, _ = la.load_pretrained(tiny_folder)
    with pytest.raises(ValueError, match=r"lavin encodes texts of its own .* tokenizer=tok"):
        la.attach(model, LavinConfig(vision=None))
    assert model.adapter is None


def test_generate_cli_gives_a_text_only_lavin_the_experts_texts(tiny_folder, pictures, tmp_path, capsys):
    """On a LaVIN without vision, --image with --expert means: the experts' texts about the image go into
    the prompt, and the image itself stays out (it used to be refused as an image the adapter cannot see)."""
    from llama_adapter.experts import PrecomputedExpert, expert_prompt_ids

    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, LavinConfig(vision=None), tokenizer=tok)
    perturb(model)
    la.save_adapter(model, tmp_path / "ad")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({pictures[0].stem: "a red circle"}))
    assert cli_main(["generate", "--model", str(tiny_folder), "--adapter", str(tmp_path / "ad"), "--prompt",
                     "what is it?", "--image", str(pictures[0]), "--expert", f"precomputed:{texts}", "--no-chat",
                     "--max-new-tokens", "5", "--device", "cpu"]) == 0
    ids = expert_prompt_ids(tok, "what is it?", pictures[0], [PrecomputedExpert(texts)], "alpaca")
    assert "a red circle" in tok.decode(ids)
    want = "".join(d[0] for d in stream_batch(model, tok, [ids], Sampling(max_new_tokens=5)))
    assert capsys.readouterr().out == want + "\n"

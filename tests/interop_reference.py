"""Test helpers for tests/test_interop*.py: tiny reference-format fixtures written from the format
descriptions (Meta folders, release .pth files), and a direct re-implementation of Meta's LLaMA
forward pass with the V1/V2 adaption prompts, biases and LoRA, to compare our loaded models with."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

PARAMS = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
          "vocab_size": -1}
FFN = 96


def train_sentencepiece(folder: Path, corpus: list[str], vocab_size: int = 96) -> int:
    """tokenizer.model in `folder` (a BPE sentencepiece model, LLaMA's ids: unk 0, bos 1, eos 2); its size."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus * 4))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


def meta_state(vocab: int, seed: int = 0, params: dict | None = None) -> dict[str, torch.Tensor]:
    """Random Meta-named LLaMA weights (norms randomised around 1)."""
    p = params or PARAMS
    g = torch.Generator().manual_seed(seed)
    dim, n_heads, n_kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    kv = dim // n_heads * n_kv

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    sd = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), "output.weight": w(vocab, dim)}
    for i in range(p["n_layers"]):
        sd.update({f"layers.{i}.attention.wq.weight": w(dim, dim), f"layers.{i}.attention.wk.weight": w(kv, dim),
                   f"layers.{i}.attention.wv.weight": w(kv, dim), f"layers.{i}.attention.wo.weight": w(dim, dim),
                   f"layers.{i}.feed_forward.w1.weight": w(FFN, dim), f"layers.{i}.feed_forward.w2.weight": w(dim, FFN),
                   f"layers.{i}.feed_forward.w3.weight": w(FFN, dim),
                   f"layers.{i}.attention_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
                   f"layers.{i}.ffn_norm.weight": 1 + 0.1 * torch.randn(dim, generator=g)})
    return sd


def shard(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's model-parallel slices: column-parallel by rows, row-parallel (wo, w2) and the embedding
    (LLaMA 1/2's ParallelEmbedding) by columns, norms replicated; every shard has rope.freqs, as LLaMA 1's."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in sd.items():
        if "norm" in name:
            parts = [t.clone() for _ in range(n)]
        elif re.search(r"(wo|w2)\.weight$", name) or name == "tok_embeddings.weight":
            parts = list(t.chunk(n, dim=1))
        else:
            parts = list(t.chunk(n, dim=0))
        for s, part in zip(out, parts):
            s[name] = part.clone()
    for s in out:
        s["rope.freqs"] = torch.randn(8)
    return out


def write_meta_folder(folder: Path, sd: dict[str, torch.Tensor], corpus: list[str], n_shards: int = 2,
                      params: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params or PARAMS))
    for i, s in enumerate(shard(sd, n_shards)):
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    return folder


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The Hugging Face conversion's permutation of wq/wk rows (interleaved -> half-split rotary pairs)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotary_meta(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta's rotary: consecutive pairs (x[2i], x[2i+1]) as complex numbers, turned by pos * theta^(-2i/d)."""
    T, d = x.shape[1], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(T).float()[:, None] * freqs[None]
    cis = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)


def linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, lora: dict | None = None) -> torch.Tensor:
    y = x @ sd[f"{name}.weight"].T
    if f"{name}.bias" in sd:
        y = y + sd[f"{name}.bias"]
    if lora and name in lora:
        l1, l2 = lora[name]
        y = y + x @ l1.T @ l2.T
    return y


def meta_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, params: dict | None = None,
                 prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 lora: dict | None = None) -> torch.Tensor:
    """Logits of Meta's LLaMA on `ids`, with optional adaption prompts {layer: (prompt [K, C], tanh gate [H])}
    (separate softmax over the prompt keys, no rotary on them) and LoRA {"layers.i.attention.wq": (l1, l2)}."""
    p = params or PARAMS
    H, G, eps = p["n_heads"], p["n_kv_heads"], p["norm_eps"]
    d = p["dim"] // H
    B, T = ids.shape
    h = sd["tok_embeddings.weight"][ids]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        x = rms(h, sd[pre + "attention_norm.weight"], eps)
        q = rotary_meta(linear(x, sd, pre + "attention.wq", lora).view(B, T, H, d)).transpose(1, 2)
        k = rotary_meta(linear(x, sd, pre + "attention.wk", lora).view(B, T, G, d)).transpose(1, 2)
        v = linear(x, sd, pre + "attention.wv", lora).view(B, T, G, d).transpose(1, 2)
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        out = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + causal).softmax(-1) @ v
        if prompts and i in prompts:
            prompt, gate = prompts[i]
            K = prompt.shape[0]
            ak = linear(prompt, sd, pre + "attention.wk", lora).view(K, G, d).transpose(0, 1)
            av = linear(prompt, sd, pre + "attention.wv", lora).view(K, G, d).transpose(0, 1)
            ak, av = ak.repeat_interleave(H // G, dim=0), av.repeat_interleave(H // G, dim=0)
            probs = ((q @ ak.transpose(-1, -2)) / math.sqrt(d)).softmax(-1)
            out = out + torch.tanh(gate).view(1, H, 1, 1) * (probs @ av)
        h = h + linear(out.transpose(1, 2).reshape(B, T, H * d), sd, pre + "attention.wo", lora)
        x = rms(h, sd[pre + "ffn_norm.weight"], eps)
        hid = F.silu(linear(x, sd, pre + "feed_forward.w1", lora)) * linear(x, sd, pre + "feed_forward.w3", lora)
        h = h + linear(hid, sd, pre + "feed_forward.w2", lora)
    return rms(h, sd["norm.weight"], eps) @ sd["output.weight"].T


def layer_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd.get(f"{name}.bias"), eps)


def clip_hidden_states(sd: dict[str, torch.Tensor], pixels: torch.Tensor, n_heads: int, patch: int,
                       adapter=None, eps: float = 1e-5) -> list[torch.Tensor]:
    """CLIP's vision tower written out from its transformers state dict (`vision_model.*` names): the input of
    the first block and the output of every block. `adapter(j, z)`, when given, transforms block j's first
    layer-norm output before attention (LaVIN's MM-adapters)."""
    p = "vision_model."
    x = F.conv2d(pixels, sd[p + "embeddings.patch_embedding.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd[p + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[p + "embeddings.position_embedding.weight"]
    x = layer_norm(x, sd, p + "pre_layrnorm", eps)
    states = [x]
    j = 0
    while f"{p}encoder.layers.{j}.layer_norm1.weight" in sd:
        pre = f"{p}encoder.layers.{j}."
        z = layer_norm(x, sd, pre + "layer_norm1", eps)
        if adapter is not None:
            z = adapter(j, z)
        B, T, D = z.shape
        d = D // n_heads
        q, k, v = (linear(z, sd, pre + f"self_attn.{n}_proj").view(B, T, n_heads, d).transpose(1, 2) for n in "qkv")
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
        x = x + linear(att.transpose(1, 2).reshape(B, T, D), sd, pre + "self_attn.out_proj")
        hid = linear(layer_norm(x, sd, pre + "layer_norm2", eps), sd, pre + "mlp.fc1")
        x = x + linear(hid * torch.sigmoid(1.702 * hid), sd, pre + "mlp.fc2")  # quick_gelu
        states.append(x)
        j += 1
    return states


def release_visual_tokens(s: dict[str, torch.Tensor], clip_tokens: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The V2 release's forward_visual on CLIP's projected tokens: clip_proj + norm, [queries ; tokens] through
    the pre-norm visual blocks (GELU MLP), the first n_queries, visual_proj + norm."""
    x = layer_norm(linear(clip_tokens, s, "clip_proj"), s, "clip_proj_norm")
    query = s["visual_query.weight"]
    x = torch.cat([query.expand(x.shape[0], -1, -1), x], 1)
    i = 0
    while f"visual_blocks.{i}.norm1.weight" in s:
        pre = f"visual_blocks.{i}."
        B, T, D = x.shape
        d = D // n_heads
        q, k, v = linear(layer_norm(x, s, pre + "norm1"), s, pre + "attn.qkv").view(B, T, 3, n_heads, d).unbind(2)
        att = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(d)).softmax(-1)
        x = x + linear((att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, D), s, pre + "attn.proj")
        x = x + linear(F.gelu(linear(layer_norm(x, s, pre + "norm2"), s, pre + "mlp.fc1")), s, pre + "mlp.fc2")
        i += 1
    return layer_norm(linear(x[:, :query.shape[0]], s, "visual_proj"), s, "visual_proj_norm")


def conv_adapter(s: dict[str, torch.Tensor], prefix: str, z: torch.Tensor, route: torch.Tensor, groups: int,
                 tau: float) -> torch.Tensor:
    """LaVIN's MM-adapter as its checkpoint describes it (k=1 convolutions, grouped ups), routed from `route` [B, C]."""
    w = torch.softmax(F.linear(route, s[prefix + "expert_weights.weight"], s[prefix + "expert_weights.bias"]) / tau, -1)
    h = F.conv1d(z.transpose(1, 2), s[prefix + "conv_A.weight"], s[prefix + "conv_A.bias"])
    b = F.conv1d(h, s[prefix + "conv_B.weight"], s[prefix + "conv_B.bias"], groups=groups)
    d = F.conv1d(h, s[prefix + "conv_D.weight"], s[prefix + "conv_D.bias"], groups=groups)
    return z + (w[:, 0, None, None] * b + w[:, 1, None, None] * d).transpose(1, 2)


def lavin_visual_tokens(s: dict[str, torch.Tensor], clip_sd: dict[str, torch.Tensor], pixels: torch.Tensor,
                        n_heads: int, patch: int, groups: int, tau: float, taps: list[int]) -> torch.Tensor:
    """LaVIN's image side: CLIP with the checkpoint's adapters before every block's attention (each example
    routed from its own [CLS]), the [CLS] after the tapped blocks, through the neck Linear -> SiLU -> Linear."""
    def adapter(j: int, z: torch.Tensor) -> torch.Tensor:
        pre = f"backbone.visual.transformer.resblocks.{j}.adapter_attn."
        return conv_adapter(s, pre, z, z[:, 0], groups, tau) if pre + "conv_A.weight" in s else z

    states = clip_hidden_states(clip_sd, pixels, n_heads, patch, adapter)
    cls = torch.stack([states[i][:, 0] for i in taps], 1)
    hid = F.silu(F.linear(cls, s["adapter_proj.conv_A.weight"], s["adapter_proj.conv_A.bias"]))
    return F.linear(hid, s["adapter_proj.conv_B.weight"], s["adapter_proj.conv_B.bias"])

"""What only a GPU can tell: training and decoding speed of the papers' 7B settings on one CUDA device.

About 5 minutes on one H100. A LLaMA-7B-shaped model with random bf16 weights (the speed does not
depend on the values; no weights to download), a random CLIP ViT-L/14-shaped encoder for LaVIN and
V2, a few training steps each of V1, V2 (caption and instruction steps) and LaVIN (half the examples
with an image) at the 7B recipes' batch and length (recipes/*_llama7b_*.yaml, fixed-length rows as
the papers padded them), through the library's own Trainer with bf16 autocast and fused SDPA; PEFT's
AdaptionPrompt on the same shape (transformers' LLaMA, SDPA) for the ratio; then batch-1 and batch-16
greedy decode against the memory-bandwidth bound. Reports tokens/s, peak memory, model FLOPs
utilisation (MFU) against the device's dense bf16 peak, and the paper V1 recipe's projected GPU-hours
(52,002 Alpaca examples x 5 epochs at 512 tokens). Writes JSON and a markdown table under
bench/results/ (gpu_check.* ; with --tiny, gpu_check_tiny.*).

Needs only torch, transformers and peft; the package runs from src/ without installing it:
    python bench/gpu_check.py                # on a CUDA machine
    python bench/gpu_check.py --tiny         # any machine, a tiny shape, in seconds (what the test runs)

MFU counts the FLOPs adapter training must do with a frozen base: the forward (2 x parameters of the
matmuls per token, plus causal attention) and, in the layers gradients reach, the backward to the
inputs only (no weight gradients for frozen weights): about 4N per token, not the 6N of full training.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Dense bf16 peak (TFLOP/s, without sparsity) and memory bandwidth (GB/s) by device name.
DEVICES: list[tuple[str, float, float]] = [
    ("H200", 989.0, 4800.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),  # 40 GB
    ("L40S", 362.0, 864.0),
    ("L4", 121.0, 300.0),
    ("A10G", 70.0, 600.0),
    ("RTX 4090", 165.0, 1008.0),
]
PAPER_V1 = {"examples": 52_002, "epochs": 5, "tokens_per_example": 512}
RECIPES = {"v1": "v1_llama7b_alpaca.yaml", "v2": "v2_llama7b_multimodal.yaml", "lavin": "lavin_llama7b_scienceqa.yaml"}
TINY_LLAMA = dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=256)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)


def device_peaks(device: torch.device, peak_tflops: float | None, bandwidth: float | None) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    found: tuple[float | None, float | None] = (None, None)
    if device.type == "cuda":
        found = next(((t, b) for key, t, b in DEVICES if key in name), found)
    return {"name": name, "bf16_peak_tflops": peak_tflops or found[0], "bandwidth_gbs": bandwidth or found[1]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1024**3, 2) if device.type == "cuda" else None


class default_dtype:
    """Build transformers' model directly in `dtype` (it keeps its rotary table in fp32 itself)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.saved = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved)


def random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place (small, so that bf16 activations stay finite through 32 layers)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def matmul_flops_per_token(cfg, seq_len: int, layers_with_grad: int) -> float:
    """Forward of every layer plus input-gradient backward of the layers gradients reach (module docstring)."""
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim or cfg.dim // cfg.n_heads
    per_layer = 2 * (d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * f)
    attention = 2 * 2 * cfg.n_heads * hd * seq_len / 2  # QK^T and AV, causal: half the keys on average
    head = 2 * d * cfg.vocab_size
    forward = cfg.n_layers * (per_layer + attention) + head
    backward = layers_with_grad * (per_layer + 2 * attention) + head
    return forward + backward


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def write_clip(folder: Path, vit: dict[str, Any]) -> Path:
    """A random-weight CLIP vision tower of the given shape, as a folder `clip:DIR` loads."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**vit))
    torch.nn.Module.to(model, torch.bfloat16)
    model.save_pretrained(str(folder))
    size = vit["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))
    return folder


def byte_tokenizer(folder: Path):
    """A small byte-level BPE tokenizer (LaVIN encodes its own prefix texts); ids stay below the vocab."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llama_adapter.model.tokenizer import Tokenizer

    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["Image: N/A the answer is", "Describe the image briefly."], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return Tokenizer(hf)


def examples(kind: str, n: int, length: int, vocab: int, images: list[Path] | None, seed: int) -> list:
    """Fixed-length random rows: the first quarter is prompt (no loss), the rest response."""
    from llama_adapter.batch import Example
    from llama_adapter.data.multimodal import MultimodalExample
    from llama_adapter.data.tokenize import IGNORE

    rng = np.random.default_rng(seed)
    out: list[Any] = []
    for i in range(n):
        ids = rng.integers(3, vocab, length).tolist()
        labels = [IGNORE] * (length // 4) + ids[length // 4:]
        if images is None:
            out.append(Example(ids, labels, f"random#{i}", kind))
        else:
            image = images[i % len(images)] if (kind == "caption" or i % 2 == 0) else None  # vqa: half with images
            out.append(MultimodalExample(ids, labels, image, f"random#{i}", kind))
    return out


def method_config(name: str, clip: Path, tiny: bool):
    import llama_adapter as la
    from llama_adapter.recipe import load_recipe

    values = dict(load_recipe(ROOT / "recipes" / RECIPES[name]).method)
    values.pop("name")
    if name in ("v2", "lavin"):
        values["vision"] = f"clip:{clip}"
        values["feature_cache"] = False  # measure the encoder on every step, as the first epoch does
    if name == "lavin":
        values["dropout"] = 0.0 if tiny else values.get("dropout", 0.1)
    if tiny:
        values = {k: v for k, v in values.items() if k not in ("n_layers",)}
        if name == "v2":
            values.update(visual_blocks=1, visual_width=32, visual_queries=4)
        if name == "lavin":
            values.update(neck_hidden=16)
    cls = {"v1": la.AdapterV1Config, "v2": la.AdapterV2Config, "lavin": la.LavinConfig}[name]
    return cls(**values)


def train_method(name: str, cfg, shape: dict[str, Any], clip: Path, images: list[Path], tok, device: torch.device,
                 steps: int, warmup: int, batch: int, length: int, tiny: bool, out_dir: Path) -> dict[str, Any]:
    import llama_adapter as la
    from llama_adapter.data.multimodal import collate_multimodal
    from llama_adapter.model.load import build_model
    from llama_adapter.train import TrainConfig, Trainer
    from llama_adapter.train.memory import split_parameters

    reset_peak(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype)  # fp32 first (rotary tables), then cast
    reset_peak(device)  # the peak of the step, not of the fp32 build
    random_init_(model)
    model.name_or_path = "random-llama-7b-shape" if not tiny else "random-tiny"
    la.attach(model, method_config(name, clip, tiny), tokenizer=tok)
    n = batch * (steps + warmup) * 2
    if name == "v1":
        train = {"instruction": examples("instruction", n, length, cfg.vocab_size, None, 0)}
        mix: dict[str, float] = {}
    elif name == "v2":
        train = {"caption": examples("caption", n, length, cfg.vocab_size, images, 1),
                 "instruction": examples("instruction", n, length, cfg.vocab_size, images, 2)}
        mix = {"caption": 0.5, "instruction": 0.5}
    else:
        train = {"vqa": examples("vqa", n, length, cfg.vocab_size, images, 3)}
        mix = {}
    bf16 = device.type == "cuda"
    tcfg = TrainConfig(out_dir=str(out_dir / name), max_steps=steps + warmup, batch_size=batch, lr=1e-3,
                       precision="bf16" if bf16 else "fp32", base_dtype="bf16" if bf16 else "fp32",
                       device=str(device), progress=False, mix=mix, clip_grad=1.0)
    trainer = Trainer(model, tcfg, train, collate_fn=lambda ex: collate_multimodal(ex, 0))
    split = split_parameters(model, set(trainer.params))
    losses, seconds = [], 0.0
    for i in range(steps + warmup):
        sync(device)
        t0 = time.perf_counter()
        rec = trainer.train_step()
        sync(device)
        if i >= warmup:
            seconds += time.perf_counter() - t0
        losses.append(rec["loss"])
    tokens = steps * batch * length
    flops = matmul_flops_per_token(cfg, length, split.layers_with_grad) * tokens
    result = {"trainable": split.trainable, "layers_with_grad": split.layers_with_grad, "steps_timed": steps,
              "tokens_per_s": round(tokens / seconds, 1), "step_s": float(f"{seconds / steps:.6g}"),
              "peak_memory_gib": peak_gib(device), "achieved_tflops": round(flops / seconds / 1e12, 3),
              "losses_finite": all(np.isfinite(losses))}
    del trainer, model
    reset_peak(device)
    return result


def train_peft(shape: dict[str, Any], device: torch.device, steps: int, warmup: int, batch: int,
               length: int, adapter_len: int, adapter_layers: int) -> dict[str, Any]:
    """PEFT's AdaptionPrompt (LLaMA-Adapter V1's idea) on transformers' LLaMA of the same shape."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    reset_peak(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kw: dict[str, Any] = dict(vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
                              intermediate_size=shape["ffn_dim"], num_hidden_layers=shape["n_layers"],
                              num_attention_heads=shape["n_heads"],
                              num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=max(length, 2048),
                              attn_implementation="sdpa")  # fused SDPA, as ours
    with torch.device(device), default_dtype(dtype):
        base = LlamaForCausalLM(LlamaConfig(**kw))
    torch.nn.Module.to(base, dtype)
    random_init_(base)
    model = get_peft_model(base, AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                      task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trainable in fp32, as ours
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.02)
    g = torch.Generator().manual_seed(0)
    seconds = 0.0
    for i in range(steps + warmup):
        ids = torch.randint(3, shape["vocab_size"], (batch, length), generator=g).to(device)
        labels = ids.clone()
        labels[:, : length // 4] = -100
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            seconds += time.perf_counter() - t0
    tokens = steps * batch * length
    result = {"trainable": sum(p.numel() for p in params), "tokens_per_s": round(tokens / seconds, 1),
              "step_s": float(f"{seconds / steps:.6g}"), "peak_memory_gib": peak_gib(device),
              "loss_finite": bool(torch.isfinite(loss).item())}
    del model, base, opt
    reset_peak(device)
    return result


@torch.no_grad()
def decode(cfg, clip: Path, tok, device: torch.device, batch: int, prompt: int, new: int, tiny: bool,
           bandwidth_gbs: float | None) -> dict[str, Any]:
    """Greedy decode with the KV cache, V1 attached (its prompt keys/values computed once)."""
    import llama_adapter as la
    from llama_adapter.model.load import build_model

    reset_peak(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype)
    reset_peak(device)
    random_init_(model)
    la.attach(model, method_config("v1", clip, tiny))
    model.to(dtype).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache(batch, prompt + new + 1)
    nxt = model(ids, cache=cache)[:, -1].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    sync(device)
    seconds = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_dim = cfg.n_kv_heads * (cfg.head_dim or cfg.dim // cfg.n_heads)
    mean_ctx = prompt + new / 2
    kv_bytes = 2 * cfg.n_layers * batch * kv_dim * mean_ctx * torch.finfo(dtype).bits // 8
    bound = batch * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes) if bandwidth_gbs else None
    rate = batch * new / seconds
    del model, cache
    reset_peak(device)
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "tokens_per_s": round(rate, 1),
            "bandwidth_bound_tokens_per_s": None if bound is None else round(bound, 1),
            "fraction_of_bound": None if bound is None else round(rate / bound, 3)}


def markdown(res: dict[str, Any]) -> str:
    dev, t = res["device"], res["train"]
    lines = [f"# GPU check ({'tiny shape' if res['tiny'] else 'LLaMA-7B shape'}) on {dev['name']}", "",
             f"Command: `{res['command']}`; torch {res['torch']}, {res['date']}.", ""]
    if not res["gpu_run"]:
        lines += ["**No GPU run was made**: this is the tiny CPU run that checks the script works; its speeds say "
                  "nothing about a GPU. Run `python bench/gpu_check.py` on a CUDA machine for the real figures.", ""]
    where = "a tiny shape" if res["tiny"] else "the 7B recipes' batch and max_len"
    lines += [f"Training: batch {res['batch']} x {res['seq_len']} tokens ({where}), "
              f"{res['steps']} timed steps after {res['warmup']} warm-up.", "",
              "| run | trainable | tokens/s | step (s) | peak memory (GiB) | TFLOP/s | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in t.items():
        lines.append(f"| {name} | {r['trainable']:,} | {r['tokens_per_s']:,} | {r['step_s']} | {r['peak_memory_gib']} "
                     f"| {r.get('achieved_tflops', '')} | {r.get('mfu', '')} |")
    lines += ["", "| decode | tokens/s | memory-bandwidth bound | fraction |", "|---|---:|---:|---:|"]
    for d in res["decode"]:
        lines.append(f"| batch {d['batch']} | {d['tokens_per_s']:,} | {d['bandwidth_bound_tokens_per_s']} "
                     f"| {d['fraction_of_bound']} |")
    p = res["projection"]
    lines += ["", f"V1 / PEFT AdaptionPrompt tokens/s: {res['v1_over_peft']}. Paper V1 recipe "
              f"({PAPER_V1['examples']:,} examples x {PAPER_V1['epochs']} epochs x "
              f"{PAPER_V1['tokens_per_example']} tokens): "
              f"{p['device_hours']} device-hours at the measured V1 rate (the paper: 8 A100-hours).", "",
              "Targets (issue 34): " + ", ".join(f"{k}: {v}" for k, v in res["targets"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on whatever device (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per method (default 8; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="the device's GB/s, if not in the table")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and markdown")
    a = ap.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not a.tiny and device.type != "cuda":
        raise SystemExit("the 7B shape needs a CUDA device; use --tiny to check the script on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        res = run(a, argv, device, Path(tmp))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_tiny" if a.tiny else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"projected paper V1 recipe: {res['projection']['device_hours']} device-hours on {res['device']['name']} "
          f"-> {out / (stem + '.json')}")
    return 0


def run(a: argparse.Namespace, argv: list[str] | None, device: torch.device, work: Path) -> dict[str, Any]:
    from llama_adapter.model.config import ModelConfig
    from llama_adapter.recipe import SHAPES, load_recipe
    from llama_adapter.vision.vit import VIT_SHAPES

    tiny = a.tiny
    steps, warmup = a.steps or (2 if tiny else 8), a.warmup if a.warmup is not None else (1 if tiny else 2)
    shape = dict(TINY_LLAMA) if tiny else dict(SHAPES["llama-7b"], max_seq_len=2048)
    v1_recipe = load_recipe(ROOT / "recipes" / RECIPES["v1"])
    batch = 2 if tiny else v1_recipe.train.batch_size
    seq_len = 32 if tiny else max(d.max_len for d in v1_recipe.data)
    cfg = ModelConfig(**shape)
    peaks = device_peaks(device, a.peak_tflops, a.bandwidth_gbs)
    vit = TINY_VIT if tiny else VIT_SHAPES["clip-vit-l-14"][1]
    clip = write_clip(work / "clip", vit)
    images = write_images(work / "images", 8, vit["image_size"])
    tok = byte_tokenizer(work)
    t_start = time.perf_counter()

    train: dict[str, dict[str, Any]] = {}
    for name in ("v1", "v2", "lavin"):
        train[name] = train_method(name, cfg, shape, clip, images, tok, device, steps, warmup, batch, seq_len, tiny,
                                   work / "runs")
    v1_cfg = method_config("v1", clip, tiny)
    train["peft_adaption_prompt"] = train_peft(shape, device, steps, warmup, batch, seq_len, v1_cfg.prompt_len,
                                               min(v1_cfg.n_layers or cfg.n_layers, cfg.n_layers))
    peak = peaks["bf16_peak_tflops"]
    for r in train.values():
        if "achieved_tflops" in r:
            r["mfu"] = round(r["achieved_tflops"] / peak, 3) if peak and device.type == "cuda" else None
    dec = [decode(cfg, clip, tok, device, b, 16 if tiny else 128, 8 if tiny else 128, tiny, peaks["bandwidth_gbs"])
           for b in (1, 16)]
    v1_rate = train["v1"]["tokens_per_s"]
    paper_tokens = PAPER_V1["examples"] * PAPER_V1["epochs"] * PAPER_V1["tokens_per_example"]
    hours = paper_tokens / v1_rate / 3600
    ratio = round(v1_rate / train["peft_adaption_prompt"]["tokens_per_s"], 3)
    gpu_run = device.type == "cuda" and not tiny
    res = {
        "gpu_run": gpu_run, "tiny": tiny, "device": peaks, "torch": torch.__version__,
        "cuda": torch.version.cuda, "command": "python " + " ".join(shlex.quote(x) for x in [
            "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shape": shape, "batch": batch,
        "seq_len": seq_len, "steps": steps, "warmup": warmup, "train": train, "decode": dec,
        "v1_over_peft": ratio,
        "projection": {"paper_v1_tokens": paper_tokens, "device_hours": round(hours, 3),
                       "device": peaks["name"]},
        "targets": {
            "v1_at_least_1.5x_peft": ratio >= 1.5 if gpu_run else None,
            "v1_mfu_at_least_0.40": (train["v1"]["mfu"] >= 0.40) if gpu_run and train["v1"]["mfu"] else None,
            "paper_v1_at_most_1_h100_hour": hours <= 1.0 if gpu_run and "H100" in peaks["name"] else None,
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "note": None if gpu_run else "no GPU run was made: tiny shape on the CPU, a check that the script works",
    }
    return res


if __name__ == "__main__":
    sys.exit(main())

"""Visual instruction following on the synthetic shapes set, per question type.

Synthesizes the set (if missing), trains the recipe's method with `llama-adapter finetune`'s
code path, then answers every held-out question greedily with the image and with a blank
grey image instead (a model that really looks drops to chance on colour and shape).
Writes bench/results/<name>.{json,md}.

    python bench/synth_vqa.py --recipe recipes/v1mm_smollm2_synth_cpu.yaml --name v1mm_synth

With `train.resume=true` (and the run's out_dir and max_steps) it scores a finished run again
without training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_threads, machine_info, write_results  # noqa: E402

import llama_adapter as la  # noqa: E402
from llama_adapter.data.multimodal import read_llava  # noqa: E402
from llama_adapter.data.synth import synthesize  # noqa: E402
from llama_adapter.eval.nll import held_out_alpaca, response_nll  # noqa: E402
from llama_adapter.eval.vqa import evaluate_vqa, evaluate_with_blank_control  # noqa: E402
from llama_adapter.recipe import load_recipe  # noqa: E402
from llama_adapter.runner import run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca"
CHANCE = {"colour": 1 / 6, "shape": 1 / 3, "colour_of": 1 / 6, "count": 1 / 4, "position": 1 / 2, "yes_no": 1 / 2,
          "side": 1 / 2}


@torch.no_grad()
def lavin_routing(model, tok, image) -> dict:
    """Per-layer routing weights (w0, w1) of a trained LaVIN model for one question asked with
    an image and without one: the two modalities should take different paths."""
    ids = torch.tensor([tok.encode("What colour is the shape?")] * 2)
    prep = model.adapter.prepare_inputs(model, ids, torch.ones_like(ids), [image, None])
    cache = model.new_cache(2, prep.length)
    model(prep.input_ids, inputs_embeds=prep.inputs_embeds, attention_mask=prep.attention_mask, cache=cache,
          extras=prep.extras)
    layers = sorted(k for k in cache.state if k[1] == "attn")
    image_w = {str(k[0]): [round(x, 4) for x in cache.state[k][0].tolist()] for k in layers}
    text_w = {str(k[0]): [round(x, 4) for x in cache.state[k][1].tolist()] for k in layers}
    gap = sum(abs(image_w[k][0] - text_w[k][0]) for k in image_w) / max(len(image_w), 1)
    return {"image": image_w, "text_only": text_w, "mean_abs_difference_of_w0": gap}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "v1mm_smollm2_synth_cpu.yaml"))
    ap.add_argument("--name", default="v1mm_synth")
    ap.add_argument("--synth", default="runs/synth")
    ap.add_argument("--n", type=int, default=2000, help="training images, if --synth is not there yet")
    ap.add_argument("--n-test", type=int, default=500,
                    help="held-out images: 500 gives the same 1,875 questions for any --n")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--alpaca-nll", type=int, default=0,
                    help="also measure the held-out Alpaca response NLL on this many records")
    ap.add_argument("--no-blank", action="store_true",
                    help="skip the blank-image control (halves the scoring time of a large test set)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(bench_threads())

    synth = Path(args.synth)
    if not (synth / "meta.json").is_file():
        synthesize(synth, args.n, seed=0, n_test=args.n_test)
    recipe = load_recipe(args.recipe, ["train.resume=false", *args.overrides])
    recipe.data[0].train = str(synth / "llava_train.json")  # the first source is the synthetic set
    t0 = time.perf_counter()
    result, model, tok = run_recipe(recipe)
    train_seconds = time.perf_counter() - t0
    src = recipe.data[0]
    t1 = time.perf_counter()
    test_file = synth / "llava_test.json"
    if args.no_blank:
        looked = evaluate_vqa(model, tok, test_file, src.template, src.image_placeholder, limit=args.test_limit)
        blind = None
    else:  # the same questions again with a blank grey image of the same size in place of each image
        looked, blind = evaluate_with_blank_control(model, tok, test_file, src.template, src.image_placeholder,
                                                    limit=args.test_limit)
    nll = None
    if args.alpaca_nll:
        held = held_out_alpaca(ALPACA / "alpaca_data_1k.json", ALPACA / "alpaca_small_2k.json", args.alpaca_nll)
        nll = response_nll(model, tok, held)
    routing = None
    if recipe.method["name"] == "lavin":
        routing = lavin_routing(model, tok, read_llava(synth / "llava_test.json")[0].image)
    eval_seconds = time.perf_counter() - t1
    figures = {
        "method": recipe.method, "steps": result.steps, "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1), "trainable_parameters": la.count_trainable(model),
        "final_train_loss": result.train_loss, "held_out_alpaca_response_nll": nll, "lavin_routing": routing,
        "accuracy_with_image": looked.by_type,
        "accuracy_blank_image": blind.by_type if blind else None, "overall_with_image": looked.accuracy,
        "overall_blank_image": blind.accuracy if blind else None, "counts": looked.counts, "chance": CHANCE,
        "single_shape_colour_and_shape_with_image": (
            (looked.by_type.get("colour", 0) * looked.counts.get("colour", 0)
             + looked.by_type.get("shape", 0) * looked.counts.get("shape", 0))
            / max(looked.counts.get("colour", 0) + looked.counts.get("shape", 0), 1)),
        "examples": looked.predictions[:12], "recipe": recipe.to_dict(),
        # per test question, in llava_test.json order, so that two runs pair (bench/pair_synth.py)
        "question_types": [p["qtype"] for p in looked.predictions],
        "correct_with_image": [p["correct"] for p in looked.predictions],
    }
    rows = ["| question type | n | with image | blank image | chance |", "|---|---|---|---|---|"]
    def blank_cell(accuracy: float | None) -> str:
        return "not scored" if accuracy is None else f"{accuracy:.1%}"

    for q in looked.by_type:
        rows.append(f"| {q} | {looked.counts[q]} | {looked.by_type[q]:.1%} | "
                    f"{blank_cell(blind.by_type[q] if blind else None)} | {CHANCE.get(q, float('nan')):.0%} |")
    rows.append(f"| all | {sum(looked.counts.values())} | {looked.accuracy:.1%} | "
                f"{blank_cell(figures['overall_blank_image'])} | |")
    table = (f"{recipe.method['name']} ({', '.join(f'{k}={v}' for k, v in recipe.method.items() if k != 'name')}), "
             f"{result.steps} steps, "
             + (f"scored again from the finished run in {result.out_dir}; " if result.start_step >= result.steps
                else f"trained in {train_seconds / 60:.1f} min on this CPU; ")
             + f"{la.count_trainable(model):,} trainable parameters."
             + (f" Held-out Alpaca response NLL ({args.alpaca_nll} records): {nll:.3f}." if nll is not None else "")
             + (f" Routing (w0 per layer) differs between an image prompt and a text-only prompt by "
                f"{routing['mean_abs_difference_of_w0']:.3f} on average." if routing else "")
             + "\n\n" + "\n".join(rows))
    write_results(args.name, figures, table, machine_info())
    print(table)
    print(json.dumps({"single_shape_colour_and_shape": figures["single_shape_colour_and_shape_with_image"]}))


if __name__ == "__main__":
    main()

"""`llama-adapter demo`: the main job on the embedded defaults, end to end, in a few minutes.

Writes a small synthetic visual instruction set, fine-tunes LLaMA-Adapter V1 multimodal
(SmolLM2-135M + EfficientNet-Lite0, both frozen) on it, and answers questions about held-out
images, printing the question, the answer, the reference and the image path.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "v1mm_smollm2_synth_cpu.yaml"


def run_demo(out: str = "runs/demo", steps: int = 160, n_images: int = 800, n_show: int = 8) -> int:
    from .data.multimodal import prompt_ids, read_llava, stop_strings
    from .data.synth import normalise_answer, synthesize
    from .eval.vqa import evaluate_vqa
    from .recipe import load_recipe
    from .train.run import run_recipe

    out_dir = Path(out)
    synth = out_dir / "synth"
    t0 = time.perf_counter()
    if not (synth / "meta.json").is_file():
        synthesize(synth, n_images, seed=0, n_test=100, overwrite=True)
    print(f"synthetic set: {synth} ({n_images} training images)")
    recipe = load_recipe(RECIPE, [f"data.train={synth / 'llava_train.json'}", f"train.out_dir={out_dir / 'v1mm'}",
                                  f"train.max_steps={steps}", "train.save_every=0"])
    result, model, tok = run_recipe(recipe)
    src = recipe.data[0]

    test = [r for r in read_llava(synth / "llava_test.json") if r.meta["qtype"] in ("colour", "shape", "count")]
    picks = random.Random(0).sample(test, min(n_show, len(test)))
    from .generate import Sampling, complete_ids

    ids = [prompt_ids(tok, r.turns[0][0], src.template, src.image_placeholder, True) for r in picks]
    sampling = Sampling(max_new_tokens=8, stop=stop_strings(src.template))
    replies = complete_ids(model, tok, ids, sampling, [r.image for r in picks])
    print("\nheld-out images:")
    for r, reply in zip(picks, replies):
        mark = "ok " if normalise_answer(reply) == normalise_answer(r.meta["answer"]) else "XX "
        print(f"  {mark}{r.image}\n      Q: {r.turns[0][0]}\n"
              f"      A: {reply.strip()}   (reference: {r.meta['answer']})")
    single = evaluate_vqa(model, tok, synth / "llava_test.json", src.template, src.image_placeholder,
                          qtypes={"colour", "shape"})
    print(f"\nsingle-shape colour/shape accuracy on {sum(single.counts.values())} held-out questions: "
          f"{single.accuracy:.0%} ({', '.join(f'{k} {v:.0%}' for k, v in single.by_type.items())})")
    print(f"loss curve: {result.out_dir / 'loss.png'}; adapter: {result.out_dir}; "
          f"total {time.perf_counter() - t0:.0f}s")
    return 0

"""`llama-adapter demo`: the main job on the embedded defaults, end to end."""

from __future__ import annotations

import time

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Write a haiku about the sea.",
)


def run_demo(model_name: str = "smollm2-135m", max_new_tokens: int = 64) -> int:
    import llama_adapter as la

    t0 = time.perf_counter()
    model, tok = la.load_pretrained(model_name)
    print(f"loaded {model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"in {time.perf_counter() - t0:.1f}s\n")
    for prompt in DEMO_PROMPTS:
        print(f">>> {prompt}")
        t0, n = time.perf_counter(), 0
        for deltas in la.stream(model, tok, [prompt], chat=tok.has_chat_template, max_new_tokens=max_new_tokens):
            print(deltas[0], end="", flush=True)
            n += 1
        print(f"\n[{n} pieces in {time.perf_counter() - t0:.1f}s]\n")
    return 0

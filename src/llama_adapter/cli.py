"""The `llama-adapter` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn
    return register


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face folder, a .gguf file or an embedded name (default: the adapter's base "
                        "model, else smollm2-135m)")
    p.add_argument("--adapter", default=None,
                   help="an adapter to load on top: our folder, a PEFT folder, or a reference .pth (LLaMA-Adapter "
                        "V1/V2 release, LaVIN; give --model for those); see docs/checkpoints.md")
    p.add_argument("--vision", default=None,
                   help="clip:<folder>: the CLIP a V2 release's or LaVIN's visual side was trained with")
    p.add_argument("--skip-visual", action="store_true",
                   help="load a V2 release or LaVIN checkpoint without its visual side (text only)")
    p.add_argument("--dtype", default="fp32",
                   help="fp32, bf16 (fp16 only on a GPU) or auto: bf16 where the CPU or GPU runs it natively")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="pack the base model's block linears to int8 or 4-bit weights (docs/quantization.md)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    decode = p.add_mutually_exclusive_group()
    decode.add_argument("--compile", action="store_true",
                        help="compile the decode step before the first token and wait for it (default on a CPU: "
                             "it compiles in the background while the first tokens decode eagerly; plain, folded "
                             "and adapted models: V1, V2 without LoRA, LaVIN; anything else decodes eagerly)")
    decode.add_argument("--eager", action="store_true",
                        help="no compiled decode step: every token through the eager model (docs/benchmarks.md)")
    p.add_argument("--force", action="store_true",
                   help="load an adapter whose recorded base model differs by name or shape (its tensors must "
                        "still fit)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                stop=tuple(a.stop), seed=a.seed)


def load_model(a: argparse.Namespace):
    """The base model with `--adapter` on top, in any format interop reads (detected)."""
    from pathlib import Path

    from llama_adapter.device import set_threads
    from llama_adapter.interop import base_of, load_adapter
    from llama_adapter.methods.io import load_adapted

    set_threads(a.threads)
    if a.adapter and Path(a.adapter).expanduser().is_dir():
        from llama_adapter.checksum import verify_checksums

        verify_checksums(Path(a.adapter).expanduser())  # a damaged adapter is refused before the base model loads
    name = a.model
    if a.adapter and name is None:
        name = base_of(a.adapter)
        if name is None and not Path(a.adapter).expanduser().is_dir():
            raise ValueError(f"{a.adapter} does not name its base model: give it with --model")
    model, tok = load_adapted(None, name, dtype=a.dtype, device=a.device, quantize=getattr(a, "quantize", None))
    if a.adapter:
        load_adapter(model, a.adapter, tokenizer=tok, force=getattr(a, "force", False),
                     vision=getattr(a, "vision", None), skip_visual=getattr(a, "skip_visual", False))
    if getattr(a, "compile", False) or getattr(a, "eager", False):
        from llama_adapter.model.fastpath import disable_compiled_decode, enable_compiled_decode

        enable_compiled_decode(model) if a.compile else disable_compiled_decode(model)
    return model, tok


@command("generate")
def cmd_generate(a: argparse.Namespace) -> int:
    import llama_adapter as la
    from llama_adapter.experts import expert_prompt_ids, load_expert
    from llama_adapter.generate import Sampling, stream_ids
    from llama_adapter.model.attached import takes_images

    model, tok = load_model(a)
    chat = tok.has_chat_template if a.chat is None else a.chat
    prompts = a.prompt or [sys.stdin.read()]
    images = a.image or []
    if len(images) > len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    experts = [load_expert(s) for s in a.expert]
    sees = takes_images(model)  # else the experts' texts are all the model gets of the image
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"### {i + 1}: {prompt}")
        image = images[i] if i < len(images) else None
        if experts:
            ids = expert_prompt_ids(tok, prompt, image, experts, "chat" if chat else "alpaca")
            pieces = stream_ids(model, tok, ids, Sampling(**sampling_kwargs(a)), image if sees else None)
        else:
            pieces = (d[0] for d in la.stream(model, tok, [prompt], images=None if image is None else [image],
                                             chat=chat, **sampling_kwargs(a)))
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    return 0


@command("chat")
def cmd_chat(a: argparse.Namespace) -> int:
    from llama_adapter.generate import Sampling, stream_ids

    model, tok = load_model(a)
    if not tok.has_chat_template:
        print("this model's tokenizer has no chat template; use `llama-adapter generate`", file=sys.stderr)
        return 2
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("Chat with the model. Empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not user:
            return 0
        if user == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": user})
        ids = tok.encode(tok.chat_prompt(messages), add_special_tokens=False)
        print("model> ", end="", flush=True)
        reply = ""
        try:
            for delta in stream_ids(model, tok, ids, Sampling(**sampling_kwargs(a))):
                reply += delta
                print(delta, end="", flush=True)
        except ValueError as e:  # the conversation outgrew the context
            print(f"\n[{e}; /reset to start over]")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


@command("finetune")
def cmd_finetune(a: argparse.Namespace) -> int:
    from llama_adapter.recipe import load_recipe
    from llama_adapter.runner import run_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    result, _, _ = run_recipe(recipe)
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(f"done: {result.steps} steps in {result.seconds:.1f}s, last train loss {result.train_loss:.4f}, "
          f"validation loss {val}; adapter in {result.out_dir}")
    return 0


@command("sweep")
def cmd_sweep(a: argparse.Namespace) -> int:
    from llama_adapter.sweep import EvalSpec, parse_grid, run_sweep

    spec = EvalSpec(a.eval, problems=a.problems, images=a.images, file=a.eval_file, limit=a.eval_limit,
                    mode=a.mode, answer_form=a.answer_form, template=a.template)
    devices = [d.strip() for d in a.devices.split(",") if d.strip()] if a.devices else []
    result = run_sweep(a.recipe, parse_grid(a.grid), spec, a.out, seeds=a.seeds, devices=devices,
                       overrides=a.overrides, reuse=a.reuse or ())
    print((result.out / "results.md").read_text())
    print(f"{len(result.ran)} run(s) trained now, {len(result.reused)} reused from other sweeps; "
          f"table, plot and runs in {result.out}")
    return 0


@command("serve")
def cmd_serve(a: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    import uvicorn

    from llama_adapter.device import set_threads
    from llama_adapter.serve import ServeConfig, Server, create_app

    set_threads(a.threads)
    adapters: dict[str, str] = {}
    for spec in a.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: give it as NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    cfg = ServeConfig(model=a.model, adapters=adapters, experts=a.expert, host=a.host, port=a.port,
                      max_batch=a.max_batch, max_queue=a.max_queue, max_tokens=a.max_tokens, api_key=a.api_key,
                      allow_remote_images=a.allow_remote_images, dtype=a.dtype, device=a.device, force=a.force,
                      quantize=a.quantize, compile=not a.eager)
    server = Server.load(cfg)
    # HTTP in a thread, decoding in the main thread (where PyTorch's CPU threads pay off: Scheduler.run)
    http = uvicorn.Server(uvicorn.Config(create_app(server, scheduler_thread=False), host=cfg.host, port=cfg.port,
                                         log_level=a.log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=http.run, name="llama-adapter-http", daemon=True)
    thread.start()
    while not http.started and thread.is_alive():
        time.sleep(0.05)
    if not http.started:
        raise ValueError(f"could not listen on {cfg.host}:{cfg.port} (see the message above)")
    names = ", ".join(server.served)
    print(f"serving {names} on http://{cfg.host}:{cfg.port} (max batch {cfg.max_batch}, queue {cfg.max_queue}"
          f"{', API key required' if cfg.api_key else ''}); Ctrl-C stops", flush=True)

    def stop(signum: int, frame: object) -> None:  # finish the current step, answer what is in flight with 503
        server.scheduler.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def stop_when_http_ends() -> None:  # the HTTP side ending (an error) ends the scheduler too
        thread.join()
        server.scheduler.stop()

    threading.Thread(target=stop_when_http_ends, daemon=True).start()
    try:
        server.scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        thread.join(timeout=10)
    return 0


@command("export")
def cmd_export(a: argparse.Namespace) -> int:
    from llama_adapter.methods.export import export_folded

    if not a.adapter:
        raise ValueError("export needs --adapter DIR")
    model, tok = load_model(a)
    out = export_folded(model, tok, a.out)
    rest = " (plus the prompt adapter in adapter/)" if (out / "adapter").is_dir() else ""
    print(f"exported a folded model to {out}{rest}")
    return 0


@command("convert")
def cmd_convert(a: argparse.Namespace) -> int:
    from llama_adapter.interop import convert

    out = convert(a.src, a.out, base=a.model, from_format=a.from_format, to=a.to, skip_visual=a.skip_visual,
                  prompt_len=a.prompt_len, temperature=a.lavin_temperature, dtype=a.dtype, vision=a.vision)
    print(f"wrote the adapter ({a.to} format) to {out}")
    return 0


@command("params")
def cmd_params(a: argparse.Namespace) -> int:
    import json

    from llama_adapter.recipe import load_recipe
    from llama_adapter.runner import parameter_counts, recipe_memory

    recipe = load_recipe(a.recipe, a.overrides)
    print(json.dumps({**parameter_counts(recipe), "memory_estimate": recipe_memory(recipe, a.devices)}, indent=2))
    return 0


@command("data")
def cmd_data(a: argparse.Namespace) -> int:
    import json

    if a.data_command == "scienceqa":
        from llama_adapter.eval.scienceqa import scienceqa_to_llava, shuffle_choices

        problems = select_scienceqa(a)
        order = a.option_order or ("shuffled" if a.protocol == "dev-train" else "original")
        if order == "shuffled":
            problems = shuffle_choices(problems, a.seed)
        n = scienceqa_to_llava(problems, a.out, fmt=a.format, experts=a.expert, image_root=a.images,
                               answer_form=a.answer_form)
        print(f"wrote {n} problems to {a.out} (choices {order}; format: llava, image_root: {a.images})")
        return 0
    from llama_adapter.data.synth import summary_dict, synthesize

    summary = synthesize(a.out, a.n, seed=a.seed, n_test=a.n_test, image_size=a.image_size,
                         ocr_words=a.ocr_words, overwrite=a.overwrite)
    print(json.dumps(summary_dict(summary), indent=1))
    return 0


def select_scienceqa(a: argparse.Namespace) -> list:
    """The problems that --problems/--images/--split/--protocol/--missing-images/--limit choose (eval and data)."""
    from llama_adapter.eval.selection import select_scienceqa as select

    return select(a.problems, a.images, split=a.split, protocol=a.protocol, missing_images=a.missing_images,
                  limit=a.limit)


@command("eval")
def cmd_eval(a: argparse.Namespace) -> int:
    if a.eval_command == "compare":
        return cmd_eval_compare(a)
    from llama_adapter.eval.scienceqa import evaluate_scienceqa, format_result, write_predictions

    problems = select_scienceqa(a)
    model, tok = load_model(a)
    template = a.template or ("chat" if tok.has_chat_template else "plain")
    result = evaluate_scienceqa(model, tok, problems, mode=a.mode, template=template, experts=a.expert,
                                batch_size=a.batch_size, image_placeholder=a.image_placeholder,
                                max_new_tokens=a.max_new_tokens, circular=a.circular, answer_form=a.answer_form)
    print(format_result(result))
    if a.out:
        write_predictions(result, a.out)
        print(f"predictions written to {a.out}")
    return 0


def cmd_eval_compare(a: argparse.Namespace) -> int:
    from llama_adapter.eval.paired import compare_prediction_files

    print(compare_prediction_files(a.a, a.b).format(a.a, a.b))
    return 0


@command("demo")
def cmd_demo(a: argparse.Namespace) -> int:
    from llama_adapter.demo import run_demo

    return run_demo(out=a.out, steps=a.steps, images=a.images, test_images=a.test_images)


def add_scienceqa_args(p: argparse.ArgumentParser) -> None:
    """Which ScienceQA problems, and how their answers are worded: shared by `eval scienceqa` and `data scienceqa`."""
    p.add_argument("--problems", required=True, help="problems.json (official or shared layout)")
    p.add_argument("--images", default=None, help="the images folder (images/<pid>/ or images/<split>/<pid>/); "
                                                  "without it the problems are given as text only")
    p.add_argument("--split", default=None, help="keep one split (e.g. dev, test, val)")
    p.add_argument("--answer-form", choices=("letter", "choice"), default="letter",
                   help='how the answer names the choice: "The answer is B." (the papers\') or "The answer is '
                        '<choice text>." (easier for small models); use the same form for training and evaluation')
    p.add_argument("--protocol", choices=("dev-val", "dev-train"), default=None,
                   help="the development protocol's validation or training problems")
    p.add_argument("--missing-images", choices=("error", "text"), default=None,
                   help="a problem whose image file is missing: an error, or text only (default: error, text "
                        "with --protocol dev-train)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")


def add_expert_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert", action="append", default=[],
                   help="ocr, caption:ADAPTER_DIR or precomputed:FILE.json (e.g. ScienceQA's captions.json): "
                        "its text about the image goes into the context (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete prompts (streams to stdout)")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read stdin")
    g.add_argument("--image", action="append", help="an image for the prompt of the same position")
    g.add_argument("--expert", action="append", default=[],
                   help="ocr, caption:ADAPTER_DIR or precomputed:FILE.json: its text about the image goes into "
                        "the instruction's context (repeatable)")
    g.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap the prompt in the chat template (default: when the model has one)")
    g.add_argument("--no-chat", dest="chat", action="store_false")

    c = sub.add_parser("chat", help="an interactive multi-turn chat in the terminal")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="a system prompt")

    f = sub.add_parser("finetune", help="train an adapter as a recipe says")
    f.add_argument("--recipe", default=None, help="a YAML recipe (see recipes/)")
    f.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")

    ds = sub.add_parser("data", help="data tools")
    ds_sub = ds.add_subparsers(dest="data_command", required=True)
    syn = ds_sub.add_parser("synth", help="write the synthetic visual instruction set")
    syn.add_argument("--out", required=True)
    syn.add_argument("--n", type=int, default=2000, help="training images")
    syn.add_argument("--n-test", type=int, default=None, help="held-out images (default n/4)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=224)
    syn.add_argument("--ocr-words", type=int, default=None, help="rendered-word training images (default n/4)")
    syn.add_argument("--overwrite", action="store_true")

    sd = ds_sub.add_parser("scienceqa", help="write ScienceQA problems as a LLaVA-style training file "
                                             "(recipes: format llava, image_root = --images)")
    add_scienceqa_args(sd)
    add_expert_arg(sd)
    sd.add_argument("--out", required=True, help="the JSON file to write")
    sd.add_argument("--format", choices=("answer", "explain"), default="answer",
                    help='target: "The answer is X." or with "BECAUSE: lecture solution" after it')
    sd.add_argument("--option-order", choices=("shuffled", "original"), default=None,
                    help="choices shuffled per pid (removes the data's answer-position prior) or as given "
                         "(default: shuffled with --protocol dev-train, else original)")
    sd.add_argument("--seed", type=int, default=0, help="the shuffle's seed")

    ev = sub.add_parser("eval", help="evaluate on a benchmark")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    sq = ev_sub.add_parser("scienceqa", help="ScienceQA accuracy overall and per group (NAT SOC LAN TXT IMG NO "
                                             "G1-6 G7-12)")
    add_model_args(sq)
    add_scienceqa_args(sq)
    sq.add_argument("--mode", choices=("generate", "ranked"), default="generate",
                    help="generate and parse the answer, or rank the choices by likelihood")
    sq.add_argument("--circular", action="store_true",
                    help="ask each problem once per rotation of its choices; right only when every answer is")
    sq.add_argument("--template", choices=("chat", "plain"), default=None,
                    help="prompt layout, as in training (default: chat when the model has a chat template)")
    sq.add_argument("--image-placeholder", default="", help="text put before the question of image problems")
    add_expert_arg(sq)
    sq.add_argument("--batch-size", type=int, default=8)
    sq.add_argument("--max-new-tokens", type=int, default=16)
    sq.add_argument("--out", default=None, help="write per-problem predictions (JSONL)")
    cp = ev_sub.add_parser("compare", help="two predictions files (eval scienceqa --out) on the same problems: "
                                           "accuracies, disagreements and McNemar's exact p-value")
    cp.add_argument("a", help="the first predictions JSONL")
    cp.add_argument("b", help="the second predictions JSONL")

    from llama_adapter.demo import DemoConfig

    d = sub.add_parser("demo", help="fine-tune V1 multimodal on synthetic shapes, then answer held-out questions "
                                    "with each image and with a blank one (a few minutes on a CPU)")
    d.add_argument("--out", default=DemoConfig.out, help="folder for the synthetic set and the adapter "
                                                         "(default: %(default)s)")
    d.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps (default: %(default)s)")
    d.add_argument("--images", type=int, default=DemoConfig.images,
                   help="synthetic training images (default: %(default)s)")
    d.add_argument("--test-images", type=int, default=DemoConfig.test_images,
                   help="held-out images, asked with the image and with a blank one (default: %(default)s)")

    sw = sub.add_parser("sweep", help="an ablation grid: train every setting x seed of a recipe, evaluate, and write "
                                      "a table with paired tests and the loss curves (docs/ablations.md)")
    sw.add_argument("--recipe", required=True, help="the YAML recipe every run starts from")
    sw.add_argument("--grid", action="append", required=True,
                    help="KEY=V1,V2,...: a dotted recipe override and its values (repeatable: the product is run)")
    sw.add_argument("--seeds", type=int, default=3, help="runs per setting, train.seed 0..N-1 (default 3)")
    sw.add_argument("--eval", required=True, choices=("scienceqa", "alpaca-nll", "synth"),
                    help="scienceqa: dev-protocol validation accuracy; alpaca-nll: held-out response NLL; "
                         "synth: synthetic VQA accuracy")
    sw.add_argument("--out", default="runs/sweep", help="the sweep's folder (rerun with the same one to resume)")
    sw.add_argument("--devices", default=None,
                    help="comma-separated devices (cuda:0,cuda:1): one run at a time on each (default: one machine, "
                         "sequential, the recipe's device)")
    sw.add_argument("--reuse", action="append", default=None, metavar="SWEEP_DIR",
                    help="another sweep's folder: its finished runs that are the same run (recipe, seed, "
                         "evaluation) are copied instead of trained again, e.g. the shared baseline (repeatable)")
    sw.add_argument("--problems", default=None, help="scienceqa: problems.json")
    sw.add_argument("--images", default=None, help="scienceqa: the images folder")
    sw.add_argument("--eval-file", default=None,
                    help="synth: the test JSON; alpaca-nll: an Alpaca file (default: the recipe's validation examples)")
    sw.add_argument("--eval-limit", type=int, default=None, help="only the first N evaluation examples")
    sw.add_argument("--mode", choices=("generate", "ranked"), default="ranked", help="scienceqa scoring")
    sw.add_argument("--answer-form", choices=("letter", "choice"), default="letter", help="scienceqa answer form")
    sw.add_argument("--template", choices=("chat", "plain"), default=None,
                    help="prompt layout for scienceqa/synth (default: the recipe's data template)")
    sw.add_argument("overrides", nargs="*", help="section.key=value applied to every run")

    ex = sub.add_parser("export", help="fold an adapter into the weights and write a Hugging Face folder")
    add_model_args(ex)
    ex.add_argument("--out", required=True)

    cv = sub.add_parser("convert", help="convert an adapter (reference .pth releases, LaVIN, PEFT, ours) to our "
                                        "format or PEFT's (see docs/checkpoints.md)")
    cv.add_argument("src", help="an adapter folder or .pth file")
    cv.add_argument("--out", required=True)
    cv.add_argument("--model", default=None, help="its base model (default: the one the adapter folder names)")
    cv.add_argument("--from", dest="from_format", default=None,
                    choices=["ours", "v1-release", "v2-release", "lavin", "peft-prompt", "peft-lora"],
                    help="the source format (default: detected)")
    cv.add_argument("--to", default="ours", choices=["ours", "peft"])
    cv.add_argument("--skip-visual", action="store_true",
                    help="drop the visual parts of a V2 release or LaVIN checkpoint (load the language side alone)")
    cv.add_argument("--vision", default=None,
                    help="clip:<folder>: the CLIP a V2 release's or LaVIN's visual side was trained with (maps it)")
    cv.add_argument("--prompt-len", type=int, default=None, help="prompt rows per layer of a release (default 10)")
    cv.add_argument("--lavin-temperature", type=float, default=None, help="LaVIN's routing temperature")
    cv.add_argument("--dtype", default=None, help="the base model's dtype while converting (default fp32)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible server (and a web page) for the base model and many "
                                      "adapters, batched together")
    sv.add_argument("--model", default="smollm2-135m", help="the base model (default: smollm2-135m)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="serve an adapter (any format `convert` reads) under NAME (repeatable)")
    add_expert_arg(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which a request gets 429")
    sv.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    sv.add_argument("--api-key", default=None,
                    help="require Authorization: Bearer KEY on every endpoint but /health (or set "
                         "LLAMA_ADAPTER_API_KEY)")
    sv.add_argument("--allow-remote-images", action="store_true",
                    help="also read http(s) image URLs and local paths (default: data: URLs only)")
    sv.add_argument("--dtype", default="auto",
                    help="fp32, bf16 (fp16 only on a GPU) or auto (default): bf16 where the CPU or GPU runs it "
                         "natively, else fp32")
    sv.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    sv.add_argument("--quantize", default=None, choices=["int8", "int4"],
                    help="pack the base model's linears to int8 or 4-bit weights (docs/quantization.md); V2 and "
                         "LoRA adapters are then served unfolded")
    speed = sv.add_mutually_exclusive_group()
    speed.add_argument("--eager", action="store_true",
                       help="decode every step eagerly (the default, as la.generate's on a CPU, decodes on compiled "
                            "steps: about 2x the tokens/s of one stream, 1.4x of 8; docs/serving.md)")
    speed.add_argument("--compile", action="store_true",
                       help="decode on compiled steps where they apply: the default (on a CPU; elsewhere the steps "
                            "stay eager until measured there)")
    sv.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    sv.add_argument("--force", action="store_true", help="load adapters that name another base model")
    sv.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")

    pc = sub.add_parser("params", help="count a recipe's trainable parameters and estimate its memory per device "
                                       "(no weights needed)")
    pc.add_argument("--recipe", default=None)
    pc.add_argument("--devices", type=int, default=8, help="devices the fsdp estimate shards the base over (default 8)")
    pc.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    from llama_adapter.train.distributed import close_process_group
    from llama_adapter.train.faults import CheckpointWriteError, NonFiniteStop, TrainingInterrupted

    args = build_parser().parse_args(argv)
    try:
        try:
            return COMMANDS[args.command](args)
        finally:
            close_process_group()
    except TrainingInterrupted as e:  # a checkpoint was written: exit code 75 says "rerun to resume"
        print(f"llama-adapter {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, ValueError, NonFiniteStop, CheckpointWriteError) as e:
        print(f"llama-adapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

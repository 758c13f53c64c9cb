"""`llama-adapter serve` as users start it: a process that decodes in its main thread and serves HTTP from
another, answers like `la.generate`, refuses a port in use, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx2
import openai

import llama_adapter as la


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "llama_adapter.cli", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_serve_command_answers_then_stops_on_sigterm(tiny_folder, tmp_path):
    model, tok = la.load_pretrained(tiny_folder)
    la.attach(model, la.AdapterV1Config(prompt_len=3, n_layers=2))
    for p in la.trainable_parameters(model).values():
        p.data.normal_(0, 0.5)
    la.save_adapter(model, tmp_path / "v1")
    port = _free_port()
    server = _start(["--model", str(tiny_folder), "--adapter", f"v1={tmp_path / 'v1'}", "--port", str(port),
                     "--max-tokens", "16", "--dtype", "fp32", "--compile"])  # the step is eager in tests (conftest)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="v1", temperature=0, max_tokens=10,
                                               messages=[{"role": "user", "content": "hello world"}])
        assert reply.choices[0].message.content == la.generate(model, tok, "hello world", chat=True,
                                                               max_new_tokens=10)[0]
        second = _start(["--model", str(tiny_folder), "--port", str(port)])
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and f"could not listen on 127.0.0.1:{port}" in out
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out
    assert f"serving base, v1 on http://127.0.0.1:{port}" in out

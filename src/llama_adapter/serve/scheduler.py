"""One scheduler thread: admits waiting requests into the running batches at token boundaries, decodes,
and hands each request its text as it comes.

Each loop: drop cancelled requests, prefill waiting ones while fewer than `max_batch` sequences run
(on their adapter's model, text prompts of one model in one pass: `prefill_groups`), then one decode step of
every batch. Requests talk to the HTTP side through an asyncio queue per request, fed with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..generate import Sampling, TextTracker, greedy_tokens, next_token
from ..model.llama import LlamaLM
from ..model.share import weight_sharing_copy
from ..model.tokenizer import Tokenizer
from .engine import DecodeBatch, Prefilled, Row, install_dispatchers, prefill_many
from .errors import APIError
from .logprobs import TokenLogprob, token_logprobs
from .metrics import Metrics
from .models import SHARED, ServedModel


@dataclass
class Job:
    """One request's generation: its prompt, where its text goes, and how it ended."""

    served: ServedModel
    prompt_ids: list[int]
    sampling: Sampling
    image: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    # ("text", str, n, index) ... then ("end", finish_reason, n, index) or ("error", APIError, n, index); n: the
    # `logprobs` entries so far; index: the job's choice in its request (`index`), whose jobs share one queue
    events: asyncio.Queue | None = None
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_new: int = 0
    last_token_at: float = 0.0
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None
    stream: bool = True  # False: the text goes out once, at the end (no wake-up of the event loop per token)
    held: str = ""
    top_logprobs: int | None = None  # None: no log-probabilities; k: each token's and its step's k most likely
    # one per generated token but EOS (serve/logprobs.py); with `echo`, the prompt's tokens' first
    logprobs: list[TokenLogprob] = field(default_factory=list)
    echo: str | None = None  # the prompt's text, which the answer starts with (completions' echo)
    generates: bool = True  # False: only the echoed prompt (max_tokens 0)

    def copies(self, n: int) -> list[Job]:
        """This job and n - 1 more of the same prompt (OpenAI's `n`), each with its own state; a seed s gives the
        i-th the seed s + i, so that the samples differ and each is reproducible."""
        out = [self]
        for i in range(1, n):
            seed = self.sampling.seed
            sampling = self.sampling if seed is None else replace(self.sampling, seed=seed + i)
            out.append(Job(self.served, self.prompt_ids, sampling, self.image, top_logprobs=self.top_logprobs,
                           echo=self.echo, generates=self.generates))
        return out

    def emit(self, kind: str, value: Any) -> None:
        if kind == "text" and not self.stream:
            self.held += value
            return
        if kind != "text" and self.held:
            self._send("text", self.held)
            self.held = ""
        self._send(kind, value)

    def _send(self, kind: str, value: Any) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value, len(self.logprobs), self.index))


class QueueFull(Exception):
    pass


# Requests prefilled together pad to the longest: at most this many positions in all per position of their own.
PREFILL_PADDING = 2.0


def prefill_groups(jobs: list[Job]) -> list[list[Job]]:
    """The requests to prefill together: text prompts of one model, shortest first, a group closed where padding
    to its longest would more than double its work (`PREFILL_PADDING`); a request with an image, or one whose prompt
    is scored (echo: logits at every position), alone."""
    by_model: dict[str, list[Job]] = {}
    groups: list[list[Job]] = []
    for job in jobs:
        if job.image is None and job.echo is None:
            by_model.setdefault(job.served.name, []).append(job)
        else:
            groups.append([job])
    for same in by_model.values():
        group: list[Job] = []
        for job in sorted(same, key=lambda j: len(j.prompt_ids)):
            own = sum(len(j.prompt_ids) for j in group) + len(job.prompt_ids)
            if group and (len(group) + 1) * len(job.prompt_ids) > PREFILL_PADDING * own:
                groups.append(group)
                group = []
            group.append(job)
        groups.append(group)
    return groups


class Scheduler:
    def __init__(self, base: LlamaLM, tok: Tokenizer, served: dict[str, ServedModel], max_batch: int,
                 max_queue: int, metrics: Metrics, tok_lock: threading.Lock, compiled: bool = False):
        self.tok, self.max_batch, self.max_queue = tok, max_batch, max_queue
        self.metrics, self.tok_lock = metrics, tok_lock
        shared = install_dispatchers(weight_sharing_copy(base))
        self.batches: dict[str, DecodeBatch] = {SHARED: DecodeBatch(shared, shared=True, compiled=compiled)}
        for s in served.values():
            if s.batch != SHARED:
                self.batches[s.batch] = DecodeBatch(s.model, shared=False, compiled=compiled)
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.admitting = 0  # taken from the queue, being prefilled: they hold slots already

    # -- the HTTP side --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a request, or raise QueueFull when `max_queue` requests already wait."""
        with self.cond:
            free_slots = max(0, self.max_batch - self.running() - self.admitting)
            if len(self.waiting) >= self.max_queue + free_slots:
                raise QueueFull
            self.waiting.append(job)
            self.metrics.queue.set(len(self.waiting))
            self.cond.notify()

    def running(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def start(self) -> None:
        """Run the scheduler in a thread of its own (the app's lifespan does this)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="llama-adapter-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=30)

    def run(self) -> None:
        """Schedule and decode until `stop()`. `llama-adapter serve` calls this in the main thread: on a CPU,
        PyTorch's intra-op threads speed up only the main thread's work (measured: a batch-8 step takes 59 ms
        there, 73 ms in another thread); the app's lifespan starts it in a thread of its own instead."""
        # inference mode for the loop's whole life: the batches' buffers are created and updated in it
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running():
                    self.cond.wait(timeout=1.0)  # a timeout, so that Ctrl-C reaches a loop in the main thread
                if self.stopping:
                    break
                for job in [j for j in self.waiting if j.cancelled.is_set()]:
                    self.waiting.remove(job)
                admit: list[Job] = []
                while self.waiting and self.running() + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
                self.metrics.queue.set(len(self.waiting))
                self.admitting = len(admit)
            for group in prefill_groups(admit):
                try:
                    self._start(group)
                except Exception as e:  # a fault of ours: these requests fail, the server goes on
                    for job in group:
                        job.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
                with self.cond:
                    self.admitting -= len(group)
            for batch in self.batches.values():
                if batch.rows:
                    self._step(batch)
            self.metrics.running.set(self.running())
        gone = APIError(503, "the server is shutting down")
        with self.cond:
            for job in self.waiting:
                job.emit("error", gone)
            self.waiting.clear()
        for batch in self.batches.values():
            for row in batch.rows:
                row.owner.emit("error", gone)
            batch.remove(range(len(batch.rows)))

    def _start(self, jobs: list[Job]) -> None:
        """Prefill requests of one model together (`prefill_groups`) and give each its first token; each joins its
        batch unless already done. A request the prefill refuses gets its own error: the others are prefilled
        again without it."""
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        s = jobs[0].served
        try:
            pres = prefill_many(s.model, self.tok, [j.prompt_ids for j in jobs],
                                None if jobs[0].image is None else [jobs[0].image],
                                every_position=jobs[0].echo is not None)
        except ValueError as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._start([job])
                return
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            jobs[0].emit("error", APIError(400, str(e), code=code, param="messages"))
            return
        self.metrics.prefill_rows.observe(len(jobs))
        for job, pre in zip(jobs, pres):
            self._begin(job, pre)

    def _begin(self, job: Job, pre: Prefilled) -> None:
        """Give a prefilled request its first token; it joins its batch unless already done."""
        s = job.served
        limit = s.model.config.max_seq_len
        job.prompt_tokens = pre.columns
        job.max_new = min(job.sampling.max_new_tokens, limit - job.prompt_tokens)
        job.tracker = TextTracker(self.tok, job.sampling.stop)
        if job.echo is not None:
            if job.top_logprobs is not None:
                assert pre.prompt_logits is not None
                job.logprobs.append(TokenLogprob(job.prompt_ids[0], None, None))  # nothing predicts the first
                job.logprobs += token_logprobs(pre.prompt_logits, job.prompt_ids[1:],
                                               [job.top_logprobs] * (len(job.prompt_ids) - 1))
            job.emit("text", job.echo)
            if not job.generates:
                job.emit("end", "length")
                return
        if job.sampling.seed is not None:
            job.generator = torch.Generator(device=s.model.device).manual_seed(job.sampling.seed)
        token = int(next_token(pre.logits[None], job.sampling, job.generator)[0])
        self._record_logprobs([job], pre.logits[None], [token])
        self.metrics.ttft.observe(time.perf_counter() - job.arrived)
        if self._deliver(job, token):
            return
        row = Row(s.model, s.name, pre.prefix, pre.state, pre.extras, pre.position, token, job)
        self.batches[s.batch].admit(row, pre)

    def _step(self, batch: DecodeBatch) -> None:
        n = len(batch.rows)
        self.metrics.batch_rows.observe(n)
        self.metrics.batch_adapters.observe(batch.adapters_in_step())
        try:
            logits = batch.step()
        except Exception as e:  # a fault of ours: fail this batch's requests, keep serving
            for row in batch.rows:
                row.owner.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            batch.remove(range(n))
            return
        greedy = greedy_tokens(logits).tolist()
        jobs: list[Job] = [row.owner for row in batch.rows]
        tokens = [greedy[i] if job.sampling.temperature == 0 else
                  int(next_token(logits[i:i + 1], job.sampling, job.generator)[0]) for i, job in enumerate(jobs)]
        self._record_logprobs(jobs, logits, tokens)
        finished = []
        for i, (row, job, token) in enumerate(zip(batch.rows, jobs, tokens)):
            row.token = token
            if job.cancelled.is_set() or self._deliver(job, token):
                finished.append(i)
        batch.remove(finished)

    def _record_logprobs(self, jobs: list[Job], logits: torch.Tensor, tokens: list[int]) -> None:
        """Each job that asked for log-probabilities gets its token's (EOS, which no answer shows, excepted), from one
        log_softmax over those jobs' rows of `logits` [n, V]."""
        rows = [i for i, (job, token) in enumerate(zip(jobs, tokens))
                if job.top_logprobs is not None and token not in self.tok.eos_ids]
        if not rows:
            return
        entries = token_logprobs(logits[rows], [tokens[i] for i in rows], [jobs[i].top_logprobs or 0 for i in rows])
        for i, entry in zip(rows, entries):
            jobs[i].logprobs.append(entry)

    def _deliver(self, job: Job, token: int) -> bool:
        """Pass a token's text to the request; True when the request is done."""
        now = time.perf_counter()
        if job.last_token_at:
            self.metrics.per_token.observe(now - job.last_token_at)
        job.last_token_at = now
        self.metrics.tokens.inc()
        assert job.tracker is not None
        with self.tok_lock:
            text = job.tracker.push(token)
        if token not in self.tok.eos_ids:
            job.completion_tokens += 1
        if text:
            job.emit("text", text)
        if job.tracker.finished:
            job.emit("end", "stop")
            return True
        if job.completion_tokens >= job.max_new:
            with self.tok_lock:
                tail = job.tracker.flush()
            if tail:
                job.emit("text", tail)
            job.emit("end", "length")
            return True
        return False

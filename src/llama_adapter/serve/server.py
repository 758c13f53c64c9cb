"""The server's state: the models, the scheduler, the metrics, and turning requests into generation jobs."""

from __future__ import annotations

import threading

from ..experts import Expert, load_expert, with_context
from ..generate import Sampling
from ..model.attached import prepares_inputs
from ..model.llama import LlamaLM
from ..model.tokenizer import Tokenizer
from .config import ServeConfig
from .errors import APIError
from .images import load_image
from .metrics import Metrics
from .models import BASE, ServedModel, base_aliases, load_models
from .prompts import render_chat
from .protocol import ChatRequest, CompletionRequest, SamplingFields, message_text
from .scheduler import Job, Scheduler


class Server:
    """Everything `create_app` serves. Build it with `Server.load(ServeConfig(...))`."""

    def __init__(self, cfg: ServeConfig, base: LlamaLM, tok: Tokenizer, served: dict[str, ServedModel],
                 experts: list[Expert]):
        self.cfg, self.base, self.tok, self.served, self.experts = cfg, base, tok, served, experts
        self.aliases = {a: BASE for a in base_aliases(cfg)}
        self.metrics = Metrics()
        self.tok_lock = threading.Lock()  # one tokenizer, used by request handlers and the scheduler thread
        self.scheduler = Scheduler(base, tok, served, cfg.max_batch, cfg.max_queue, self.metrics, self.tok_lock,
                                   compiled=cfg.compile)

    @classmethod
    def load(cls, cfg: ServeConfig) -> Server:
        base, tok, served = load_models(cfg)
        return cls(cfg, base, tok, served, [load_expert(s) for s in cfg.experts])

    @property
    def context(self) -> int:
        return self.base.config.max_seq_len

    def resolve(self, name: str) -> ServedModel:
        served = self.served.get(self.aliases.get(name, name))
        if served is None:
            known = ", ".join(self.served)
            raise APIError(404, f"the model {name!r} does not exist on this server (serving: {known})",
                           code="model_not_found", param="model")
        return served

    def models(self) -> list[dict]:
        return [{"id": s.name, "object": "model", "created": 0, "owned_by": "llama-adapter", "method": s.method,
                 "images": s.images, "folded": s.folded,
                 **({"root": str(self.cfg.model)} if s.name == BASE else {})} for s in self.served.values()]

    def _sampling(self, req: SamplingFields) -> Sampling:
        wanted = req.wanted_tokens()
        if wanted is not None and wanted > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens is {wanted}, above this server's bound of {self.cfg.max_tokens}",
                           code="invalid_value", param="max_tokens")
        return Sampling(max_new_tokens=wanted or self.cfg.max_tokens, temperature=req.temperature, top_p=req.top_p,
                        stop=req.stops(), seed=req.seed)

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} "
                                f"(at least one position must stay free for the answer)",
                           code="context_length_exceeded", param="messages")

    def chat_jobs(self, req: ChatRequest) -> list[Job]:
        """The generations a chat request asks for (images decoded, experts run, prompt laid out; `n` of them)."""
        served = self.resolve(req.model)
        sampling, top = self._sampling(req), req.wanted_logprobs()
        messages: list[tuple[str, str]] = []
        urls: list[str] = []
        for m in req.messages:
            text, images = message_text(m)
            messages.append(("system" if m.role == "developer" else m.role, text))
            urls += images
        if messages[-1][0] != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        if len(urls) > self.cfg.max_images:
            raise APIError(400, f"{len(urls)} images; this server takes at most {self.cfg.max_images} per request",
                           code="too_many_images", param="messages")
        if urls and not served.images and not self.experts:
            raise APIError(400, f"the model {served.name!r} takes no images (a text-only adapter); send text only "
                                f"or pick an adapter that takes images", code="images_not_supported", param="messages")
        image = load_image(urls[0], self.cfg) if urls else None
        expert_text = with_context("", [e.describe(image) for e in self.experts]) if image is not None else ""
        with self.tok_lock:
            ids = render_chat(self.tok, served.layout, messages, expert_text, has_image=image is not None)
        self._check_length(ids)
        return Job(served, ids, sampling, image if served.images else None, top_logprobs=top).copies(req.n)

    def completion_jobs(self, req: CompletionRequest) -> list[Job]:
        """The generations a completions request asks for: `n` per prompt, choice p * n + i the i-th of prompt p."""
        served = self.resolve(req.model)
        sampling, top = self._sampling(req), req.wanted_logprobs()
        if req.echo and prepares_inputs(served.model):
            raise APIError(400, f"echo needs an adapter that adds no inputs of its own; {served.name!r} "
                                f"({served.method}) inserts tokens before the prompt's", param="echo")
        jobs, generates = [], req.wanted_tokens() != 0
        for prompt in req.prompts():
            ids, text = self._encode(prompt)
            self._check_length(ids)
            jobs += Job(served, ids, sampling, top_logprobs=top, echo=text if req.echo else None,
                        generates=generates).copies(req.n)
        return jobs

    def _encode(self, prompt: str | list[int]) -> tuple[list[int], str]:
        """A completion prompt's token ids and text (ids given are checked against the vocabulary)."""
        with self.tok_lock:
            if isinstance(prompt, str):
                return self.tok.encode(prompt), prompt
            vocab = self.tok.vocab_size
            wrong = [t for t in prompt if not 0 <= t < vocab]
            if wrong:
                raise APIError(400, f"token id {wrong[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            return list(prompt), self.tok.decode(prompt, skip_special_tokens=False)


"""OpenAI's request bodies (the fields this server reads), validated into 400s that name the field."""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError
from .logprobs import MAX_TOP_CHAT, MAX_TOP_COMPLETIONS

MAX_CHOICES = 16  # choices in one request: n, times the prompts of a completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields this server does not use (user, ...)


class ImageURL(_Body):
    url: str


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per prompt

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return tuple(s for s in stops if s)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each generated token's and its step's k most likely (serve/logprobs.py)."""
        return None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_CHAT)

    def wanted_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # a text or token ids, or a list of such prompts
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_COMPLETIONS)
    echo: bool = False  # the answer starts with the prompt, and its log-probabilities with the prompt's tokens'
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing

    def wanted_tokens(self) -> int | None:
        wanted = super().wanted_tokens()
        if wanted == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (scoring a prompt)", param="max_tokens")
        return wanted

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a text or token ids (as a tokenizing client, an evaluation harness, sends
        them), n choices each: at most MAX_CHOICES in all."""
        prompt = self.prompt
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = cast("list[str | list[int]]", prompt if many else [prompt])
        if len(prompts) * self.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n = {self.n}: {len(prompts) * self.n} choices; at most "
                                f"{MAX_CHOICES} per request", param="prompt")
        if not all(prompts):
            raise APIError(400, "a prompt is empty", param="prompt")
        return prompts


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def validate(cls: type[SamplingFields], data: Any) -> Any:
    """The body as `cls`, or a 400 naming the first wrong field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"{where}: {err['msg']}", code="invalid_value", param=where) from None


def message_text(m: Message) -> tuple[str, list[str]]:
    """(the message's text, its image URLs)."""
    if m.content is None or isinstance(m.content, str):
        return m.content or "", []
    texts = [p.text or "" for p in m.content if p.type == "text"]
    urls = [p.image_url.url for p in m.content if p.type == "image_url" and p.image_url is not None]
    if any(p.type == "image_url" and p.image_url is None for p in m.content):
        raise APIError(400, "an image_url content part needs image_url.url", param="messages")
    return "\n".join(texts), urls

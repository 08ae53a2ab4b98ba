"""The OpenAI API over the swarm: /v1/models, /v1/completions, /v1/chat/completions (streamed or not).

Requests and errors follow OpenAI's shapes, so its SDKs work unchanged. Streams are server-sent
events, one chunk per token (text held back only while it may begin a stop string).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarm.errors import ConfigError, MissingBlocksError, SwarmError
from swarm.serve.engine import Engine, Overloaded, Sampling
from swarm.serve.text import Detokenizer, TextModel

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class UnknownModel(SwarmError):
    def __init__(self, asked: str, served: str) -> None:
        super().__init__(f"the model {asked!r} does not exist here; this server serves {served!r}")


class _Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0, le=2)
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @pydantic.field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stop)}")
        return stop

    def sampling(self, max_tokens: int) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(max_tokens, self.temperature, self.top_p, self.seed, tuple(stops))

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] = pydantic.Field(union_mode="left_to_right")

    @pydantic.field_validator("prompt")
    @classmethod
    def _single(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
        return prompt


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)


@dataclass
class Outcome:
    """How a generation ended, known once its stream is exhausted."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class OpenAIServer:
    """Routes of the OpenAI API for one served model."""

    def __init__(
        self, engine: Engine, text_model: TextModel, model_id: str, aliases: tuple[str, ...] = ()
    ) -> None:
        self.engine, self.text_model, self.model_id = engine, text_model, model_id
        self.names = {model_id, *aliases}
        self.created = int(time.time())

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/models", self.models, methods=["GET"])
        router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        router.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        return router

    async def models(self) -> dict[str, Any]:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "swarm"}
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = str(prompt[0])
        ids = self.text_model.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        return await self._respond(body, ids, max_tokens, "text_completion", _completion_choice)

    async def chat(self, body: ChatRequest) -> Any:
        self._check_model(body.model)
        ids = self.text_model.chat_ids([m.plain() for m in body.messages])
        # Chat's default is "as much as the context allows", as OpenAI's.
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.engine.context - len(ids))
        return await self._respond(body, ids, max_tokens, "chat.completion", _chat_choice)

    def _check_model(self, name: str) -> None:
        if name not in self.names:
            raise UnknownModel(name, self.model_id)

    async def _respond(
        self,
        body: _Request,
        ids: list[int],
        max_tokens: int,
        kind: str,
        choice: Callable[..., dict[str, Any]],
    ) -> Any:
        self._check_model(body.model)
        self.engine.check_length(len(ids), max_tokens)
        release = await self.engine.admission.acquire()
        try:
            await self.engine.check_coverage()
        except BaseException:
            release()
            raise
        outcome = Outcome(prompt_tokens=len(ids))
        deltas = self._deltas(ids, body.sampling(max_tokens), release, outcome)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}
        if not body.stream:
            text = "".join([d async for d in deltas])
            final = choice(text, outcome.finish_reason, final=True)
            return {**head, "object": kind, "choices": [final], "usage": outcome.usage()}
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        return EventSourceResponse(
            _events(deltas, head | {"object": chunk_kind}, choice, outcome, body.include_usage),
            ping=600,  # tokens are the keep-alive; no comment lines mid-answer
            # A client gone before the first event means the generator never starts (and never
            # frees the slot); this runs after the response in every case. Releasing is idempotent.
            background=BackgroundTask(release),
        )

    async def _deltas(
        self, ids: list[int], sampling: Sampling, release: Callable[[], None], outcome: Outcome
    ) -> AsyncIterator[str]:
        detok = Detokenizer(self.text_model, sampling.stop)
        async with contextlib.aclosing(self.engine.tokens(ids, sampling, release)) as tokens:
            async for token in tokens:
                outcome.completion_tokens += 1
                if self.engine.is_eos(token):
                    outcome.finish_reason = "stop"
                delta = detok.add(token)
                if delta:
                    yield delta
                if detok.stopped:
                    outcome.finish_reason = "stop"
                    break
        if rest := detok.flush():
            yield rest


async def _events(
    deltas: AsyncIterator[str],
    head: dict[str, Any],
    choice: Callable[..., dict[str, Any]],
    outcome: Outcome,
    include_usage: bool,
) -> AsyncIterator[str]:
    if head["object"] == "chat.completion.chunk":  # OpenAI opens a chat stream with the role
        yield json.dumps(
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        )
    try:
        async for delta in deltas:
            yield json.dumps({**head, "choices": [choice(delta, None, final=False)]})
    except SwarmError as e:  # headers are sent: report in the stream, as OpenAI does
        yield json.dumps(
            {"error": {"message": str(e), "type": "service_unavailable", "param": None, "code": None}}
        )
        return
    yield json.dumps({**head, "choices": [choice("", outcome.finish_reason, final=False)]})
    if include_usage:
        yield json.dumps({**head, "choices": [], "usage": outcome.usage()})
    yield "[DONE]"


def _completion_choice(text: str, finish: str | None, *, final: bool) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _chat_choice(text: str, finish: str | None, *, final: bool) -> dict[str, Any]:
    if final:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}


# ---------------------------------------------------------------------------------------- errors ---


def error_response(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error object with the status its SDK expects."""

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    async def swarm_error(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, UnknownModel):
            return error_response(404, str(exc), "invalid_request_error", "model_not_found")
        if isinstance(exc, Overloaded):
            return error_response(
                429,
                str(exc),
                "rate_limit_error",
                "rate_limit_exceeded",
                **{"Retry-After": str(exc.retry_after)},
            )
        if isinstance(exc, ConfigError):
            return error_response(400, str(exc), "invalid_request_error")
        if isinstance(exc, MissingBlocksError):
            return error_response(503, str(exc), "service_unavailable", "blocks_not_served")
        return error_response(503, f"the swarm failed this request: {exc}", "service_unavailable")

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(SwarmError, swarm_error)
    app.add_exception_handler(StarletteHTTPException, http_error)

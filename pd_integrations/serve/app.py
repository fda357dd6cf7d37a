"""The OpenAI-compatible FastAPI app over one engine: `create_app(engine, settings)`.

Each request runs the engine in a worker thread of its own (`engine.stream`), so concurrent requests reach the
engine's runtime together and it schedules their forward steps; the app adds no batching of its own. A request
holds a `RequestSlots` slot from admission until its response is done. A streaming client that disconnects stops
its generation: the engine's stream is closed as soon as the step it is in finishes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..config import PromptDistillConfig
from ..engine import GenerationStream, PromptDistillEngine
from ..loading import DEFAULT_MODEL
from ..results import GenerationResult
from .errors import SERVER_ERROR, RequestError, engine_rejection, install_error_handlers, logger
from .limits import BodySizeLimit, RequestSlots
from .openai_schema import ChatCompletionRequest, CompletionRequest, GenerationRequest, ResponseIds

API_KEY_ENVIRONMENT = "PD_SERVE_API_KEY"
STATS_HEADER = "x-promptdistill"


@dataclass(frozen=True)
class ServerSettings:
    """What `pd-serve` is told: the model and how to load it, and the server's limits.

    `api_key` None serves without authentication; `cors_origins` empty sends no CORS headers.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_queued_requests: int = 64
    cors_origins: tuple[str, ...] = field(default_factory=tuple)

    def load_engine(self) -> PromptDistillEngine:
        return PromptDistillEngine.from_pretrained(self.model, device=self.device, dtype=self.dtype,
                                                   quantization=self.quantization)


def create_app(engine: PromptDistillEngine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The server's app: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models` over `engine`,
    served under `settings.model`'s name, and an unauthenticated `/health`."""
    app = FastAPI(title="pd-serve", summary="PromptDistill behind OpenAI's API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    server = _Server(engine, settings.model, RequestSlots(settings.max_queued_requests))
    authorized = [Depends(partial(_check_api_key, settings.api_key))] if settings.api_key else []

    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models", dependencies=authorized)(server.models)
    app.post("/v1/chat/completions", dependencies=authorized)(server.chat_completions)
    app.post("/v1/completions", dependencies=authorized)(server.completions)
    return app


def _check_api_key(api_key: str, request: Request) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_key.encode()):
        raise RequestError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class _Server:
    """The endpoints' state: the engine, the name it is served under, the request slots and the worker-thread
    limiter (one thread per admitted request, so no request waits for a thread while the engine could take it)."""

    def __init__(self, engine: PromptDistillEngine, model_name: str, slots: RequestSlots):
        self.engine, self.model_name, self.slots = engine, model_name, slots
        self.threads = anyio.CapacityLimiter(slots.capacity)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "pd-integrations"}]}

    async def chat_completions(self, request: ChatCompletionRequest):
        return await self._respond(request, ResponseIds("chat", self.model_name))

    async def completions(self, request: CompletionRequest):
        return await self._respond(request, ResponseIds("text", self.model_name))

    async def _respond(self, request: GenerationRequest, ids: ResponseIds):
        self._check(request)
        self.slots.take()
        try:
            stream = await self._start(request)
        except BaseException:
            self.slots.give_back()
            raise
        if request.stream:
            return _EventStream(self, stream, ids, request.include_usage())
        try:
            result = await self._in_thread(_finish, stream)
        finally:
            self.slots.give_back()
        body = ids.completion(result)
        # Also as a header, for clients that drop unknown body fields (LangChain's ChatOpenAI shows headers in
        # response_metadata with include_response_headers=True).
        return JSONResponse(body, headers={STATS_HEADER: json.dumps(body["promptdistill"], separators=(",", ":"))})

    def _check(self, request: GenerationRequest) -> None:
        if request.model != self.model_name:
            raise RequestError(404, f"the model {request.model!r} does not exist; this server serves "
                                    f"{self.model_name!r}", param="model", code="model_not_found")
        refused = request.unsupported()
        if refused:
            raise RequestError(400, refused[1], param=refused[0], code="unsupported_parameter")

    async def _start(self, request: GenerationRequest) -> GenerationStream:
        """The engine's stream for `request`; the engine checks every argument here, before any model work."""
        options = request.promptdistill
        try:
            engine = self.engine
            if options is not None and options.config_fields():
                engine = engine.with_config(PromptDistillConfig(**options.config_fields()))
            selection = {} if options is None else {"query": options.query, "documents": options.documents}
            return await self._in_thread(partial(engine.stream, **request.engine_input(), **selection,
                                                 **request.sampling()))
        except (ValueError, TypeError) as error:
            raise engine_rejection(error, request) from error

    async def _in_thread(self, call, *args):
        return await anyio.to_thread.run_sync(call, *args, limiter=self.threads)


def _finish(stream: GenerationStream) -> GenerationResult:
    for _ in stream:
        pass
    return stream.result


class _EventStream(StreamingResponse):
    """Server-sent events of one generation in OpenAI's chunk format, ending with `data: [DONE]`.

    Whichever way the response ends (finished, client gone, server stopping), the engine's stream is closed and
    the request's slot given back. Each step runs in a worker thread that cancellation waits for, so the stream
    is never closed while a step of it runs.
    """

    def __init__(self, server: _Server, stream: GenerationStream, ids: ResponseIds, with_usage: bool):
        self.server, self.deltas, self.ids, self.with_usage = server, iter(stream), ids, with_usage
        self.stream = stream
        super().__init__(self._events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.server._in_thread(self.deltas.close)
            self.server.slots.give_back()

    async def _events(self) -> AsyncIterator[str]:
        ids, first = self.ids, True
        try:
            async for text in self._deltas():
                yield _event(ids.chunk(text, first=first, with_usage=self.with_usage))
                first = False
        except Exception as error:  # the 200 has gone out: a failure can only be reported in the stream
            logger.exception("streaming generation failed", exc_info=error)
            yield _event(SERVER_ERROR.body())
            return
        result = self.stream.result
        if first:  # nothing was generated: the role still opens the message
            yield _event(ids.chunk("", first=True, with_usage=self.with_usage))
        yield _event(ids.chunk(result=result, with_usage=self.with_usage))
        if self.with_usage:
            yield _event(ids.usage_chunk(result))
        yield "data: [DONE]\n\n"

    async def _deltas(self) -> AsyncIterator[str]:
        finished = object()
        while (text := await self.server._in_thread(next, self.deltas, finished)) is not finished:
            yield text


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

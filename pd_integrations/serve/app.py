"""The OpenAI-compatible FastAPI app over one engine: `create_app(engine, settings)`.

Each request runs the engine in a worker thread of its own (`engine.stream_batch`, one row per choice: `n` per
prompt), so concurrent requests reach the engine's runtime together and it schedules their forward steps; the app
adds no batching of its own. A request holds a `RequestSlots` slot from admission until its response is done. A
client that disconnects, streaming or not, stops its generation: the engine's stream is closed as soon as the step
it is in finishes. The fields it takes and refuses: docs/openai-compat.md.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from functools import partial

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine import BatchStream, PromptDistillEngine
from ..inputs import SamplingParams
from ..tools import resolve_tool_format
from .errors import SERVER_ERROR, RequestError, engine_rejection, install_error_handlers, logger
from .limits import BodySizeLimit, RequestSlots
from .openai_schema import ChatCompletionRequest, CompletionRequest, GenerationRequest, Output, ResponseIds
from .settings import ServerSettings

STATS_HEADER = "x-promptdistill"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response; only logs see it


def create_app(engine: PromptDistillEngine, settings: ServerSettings = ServerSettings()) -> FastAPI:  # noqa: B008 (frozen, so sharing one default is safe)
    """The server's app: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models` over `engine`,
    served under `settings.model`'s name, and an unauthenticated `/health`. The settings' scheduler fields apply
    to the engine's runtime, which every engine over it shares, and a worker thread runs its forwards (requests
    are stepped in changing threads, so none of them is the one to drive). Raises `ValueError` for a `tool_format`
    the engine's chat template cannot honour."""
    resolve_tool_format(engine.tokenizer, settings.tool_format)
    engine.configure_scheduler(driver="thread", **settings.scheduler_settings())
    app = FastAPI(title="pd-serve", summary="PromptDistill behind OpenAI's API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    server = _Server(engine, settings.model, RequestSlots(settings.max_queued_requests), settings.tool_format)
    authorized = [Depends(partial(_check_api_key, settings.api_key))] if settings.api_key else []

    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models", dependencies=authorized)(server.models)
    app.get("/v1/models/{model_id:path}", dependencies=authorized)(server.model)
    app.post("/v1/chat/completions", dependencies=authorized)(server.chat_completions)
    app.post("/v1/completions", dependencies=authorized)(server.completions)
    return app


def _check_api_key(api_key: str, request: Request) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_key.encode()):
        raise RequestError(
            401,
            "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


class _Server:
    """The endpoints' state: the engine, the name it is served under, the request slots and the worker-thread
    limiter (one thread per admitted request, so no request waits for a thread while the engine could take it)."""

    def __init__(self, engine: PromptDistillEngine, model_name: str, slots: RequestSlots, tool_format: str):
        self.engine, self.model_name, self.slots, self.tool_format = engine, model_name, slots, tool_format
        self.threads = anyio.CapacityLimiter(slots.capacity)
        # OpenAI's "backend configuration" for reproducibility: the model and the engine's resolved config.
        served = f"{model_name}|{engine.model_name}|{engine.config}|{tool_format}"
        self.fingerprint = "fp_" + hashlib.sha256(served.encode()).hexdigest()[:12]

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pd-integrations"}

    def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    def model(self, model_id: str) -> dict:
        if model_id != self.model_name:
            raise RequestError(
                404,
                f"the model {model_id!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return self._card()

    async def chat_completions(self, body: ChatCompletionRequest, http: Request):
        return await self._respond(
            body, http, ResponseIds("chat", self.model_name, self.fingerprint, body.n, self.engine.tokenizer)
        )

    async def completions(self, body: CompletionRequest, http: Request):
        return await self._respond(
            body, http, ResponseIds("text", self.model_name, self.fingerprint, body.n, self.engine.tokenizer)
        )

    async def _respond(self, request: GenerationRequest, http: Request, ids: ResponseIds) -> Response:
        self._check(request)
        self.slots.take()
        try:
            generation = _Generation(self, await self._start(request))
        except BaseException:
            self.slots.give_back()
            raise
        outputs = [request.output() for _ in range(request.sequences)]
        if request.stream:
            return _EventStream(generation, outputs, ids, request.include_usage())
        deltas: list[list[dict]] = [[] for _ in outputs]
        try:
            async for row, text in generation.deltas():
                if await http.is_disconnected():
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                deltas[row] += outputs[row].feed(text)
        finally:
            await generation.close()
        results = generation.stream.result
        body = ids.completion(
            [
                (result, row + output.close(result), output.finish_reason(result))
                for result, row, output in zip(results, deltas, outputs)
            ]
        )
        # Also as a header, for clients that drop unknown body fields (LangChain's ChatOpenAI shows headers in
        # response_metadata with include_response_headers=True).
        return JSONResponse(body, headers={STATS_HEADER: json.dumps(body["promptdistill"], separators=(",", ":"))})

    def _check(self, request: GenerationRequest) -> None:
        if request.model != self.model_name:
            raise RequestError(
                404,
                f"the model {request.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        invalid = request.invalid()
        if invalid:
            raise RequestError(400, invalid[1], param=invalid[0], code="invalid_value")
        refused = request.unsupported()
        if refused:
            raise RequestError(400, refused[1], param=refused[0], code="unsupported_parameter")

    async def _start(self, request: GenerationRequest) -> BatchStream:
        """The engine's stream for `request`, constrained to the output it asks for (`response_format`, tools);
        the grammar and the engine check every argument here, before any model work."""
        try:
            engine = self.engine
            config = None if request.promptdistill is None else request.promptdistill.config()
            if config is not None:
                engine = engine.with_config(config)
            return await self.in_thread(partial(self._open, engine, request))
        except ImportError as error:  # the grammar library is an optional extra
            param = "tools" if request.output_options().tools else "response_format"
            raise RequestError(
                400, f"this server cannot constrain output: {error}", param=param, code="unsupported_parameter"
            ) from error
        except (ValueError, TypeError) as error:
            raise engine_rejection(error, request) from error

    def _open(self, engine: PromptDistillEngine, request: GenerationRequest) -> BatchStream:
        # In a worker thread: the first grammar of a model scans its vocabulary (about a second). The grammar
        # gives each row a matcher of its own.
        grammar = request.output_options().grammar(engine)
        sampling = SamplingParams(**request.sampling(), constraint=grammar)
        return engine.stream_batch(request.prompt_inputs(self.tool_format), sampling=sampling)

    async def in_thread(self, call, *args):
        return await anyio.to_thread.run_sync(call, *args, limiter=self.threads)


class _Generation:
    """One request's engine stream, stepped in worker threads. Closing it stops the generation after the step in
    progress (cancellation waits for a worker thread, so the stream is never closed while a step of it runs) and
    gives the request's slot back."""

    def __init__(self, server: _Server, stream: BatchStream):
        self.server, self.stream, self._steps = server, stream, iter(stream)

    async def deltas(self) -> AsyncIterator[tuple[int, str]]:
        """`(row, text delta)` as the rows generate."""
        finished = object()
        while (text := await self.server.in_thread(next, self._steps, finished)) is not finished:
            yield text

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):  # also when the response was cancelled by the client leaving
            await self.server.in_thread(self._steps.close)
        self.server.slots.give_back()


class _EventStream(StreamingResponse):
    """Server-sent events of one generation in OpenAI's chunk format, ending with `data: [DONE]`. Whichever way
    the response ends (finished, client gone, server stopping), the generation is closed."""

    def __init__(self, generation: _Generation, outputs: list[Output], ids: ResponseIds, with_usage: bool):
        self.generation, self.outputs, self.ids, self.with_usage = generation, outputs, ids, with_usage
        super().__init__(self._events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.close()

    async def _events(self) -> AsyncIterator[str]:
        ids, outputs, opened = self.ids, self.outputs, [False] * len(self.outputs)

        def chunk(row: int, delta: dict | None = None, **final) -> str:
            first, opened[row] = not opened[row], True  # the role opens each choice's message
            return _event(ids.chunk(delta, index=row, first=first, with_usage=self.with_usage, **final))

        try:
            async for row, text in self.generation.deltas():
                for delta in outputs[row].feed(text):
                    yield chunk(row, delta)
        except Exception as error:  # the 200 has gone out: a failure can only be reported in the stream
            logger.exception("streaming generation failed", exc_info=error)
            yield _event(SERVER_ERROR.body())
            return
        results = self.generation.stream.result
        for row, (output, result) in enumerate(zip(outputs, results)):
            for delta in output.close(result):
                yield chunk(row, delta)
            if not opened[row]:  # nothing was generated: the role still opens the message
                yield chunk(row, {"content": ""})
            yield chunk(row, result=result, finish_reason=output.finish_reason(result))
        if self.with_usage:
            yield _event(ids.usage_chunk(results))
        yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

"""What protects the server from its clients: a bound on request bodies and on requests waiting for the engine."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RequestError


class BodySizeLimit:
    """ASGI middleware answering 413 to a request whose body exceeds `max_bytes`, declared or streamed.

    The body is read here (a JSON request is read whole by the endpoint anyway) and replayed to the app; later
    messages, the client's disconnect among them, pass through, so streaming responses still see it leave.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestError(
            413,
            f"the request body exceeds {self.max_bytes} bytes (the server's --max-body-bytes)",
            code="request_too_large",
        )
        await error.response()(scope, receive, send)


class RequestSlots:
    """At most `capacity` requests admitted and not yet finished, generating or waiting for the engine; one more
    is refused with 429 and a `Retry-After` hint rather than queued without bound.

    Used from the event loop only, so a plain counter is enough.
    """

    RETRY_AFTER_SECONDS = 1

    def __init__(self, capacity: int):
        self.capacity, self.taken = capacity, 0

    def take(self) -> None:
        """Admit one request (release it with `give_back`); raises the 429 `RequestError` when all are taken."""
        if self.taken >= self.capacity:
            raise RequestError(
                429,
                f"the server already has {self.capacity} requests queued (its --max-queued-requests); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.RETRY_AFTER_SECONDS)},
            )
        self.taken += 1

    def give_back(self) -> None:
        self.taken -= 1

"""Errors as OpenAI sends them, `{"error": {"message", "type", "param", "code"}}`, for every way a request can fail.

Bad input is never a 500: FastAPI's validation errors become 400 (malformed JSON, or a value a field's own check
refuses, such as `promptdistill.budgets: 0`) or 422 (a field of the wrong type or shape), and the
`ValueError`/`TypeError` the engine raises before any model work becomes 400 with `param` set to the request field
that the engine's message names.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..config import PromptDistillConfig
from .openai_schema import SAMPLING_FIELDS, GenerationRequest, error_body

logger = logging.getLogger("pd_integrations.serve")

# The engine's messages start with the argument they are about ("temperature must be ...", "documents[2] is
# empty ..."); these are the request fields each argument comes from.
_ENGINE_ARGUMENTS = {
    **{name: own for own, name in SAMPLING_FIELDS.items() if name != "max_new_tokens"},  # that one: max_tokens_param
    "messages": "messages",
    "prompt": "prompt",
    "query": "promptdistill.query",
    "documents": "promptdistill.documents",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls",
    "response_format": "response_format",
    **{name: f"promptdistill.{name}" for name in PromptDistillConfig.__dataclass_fields__},
}


class RequestError(Exception):
    """A request the server refuses, with OpenAI's error fields and the HTTP status to send."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


SERVER_ERROR = RequestError(500, "the server failed while generating; see its log", type="server_error")


def engine_rejection(error: ValueError | TypeError, request: GenerationRequest) -> RequestError:
    """The 400 for an argument the engine refused, naming the request field it came from."""
    message = re.sub(r"^row \d+: ", "", str(error))  # a request's rows are its choices: they share their input
    if "context window" in message or "max_prompt_tokens=" in message:  # the model's limit or the server's
        field = "messages" if "messages" in request.model_fields_set else "prompt"
        return RequestError(400, message, param=field, code="context_length_exceeded")
    if "max_kv_bytes=" in message:  # the server's KV cache bound, counted with the tokens the request may generate
        return RequestError(400, message, param=request.max_tokens_param, code="kv_cache_limit_exceeded")
    argument = re.match(r"([a-z_]+)(\[\d+\])?", message)
    name, index = argument.groups(default="") if argument else ("", "")
    param = request.max_tokens_param if name == "max_new_tokens" else _ENGINE_ARGUMENTS.get(name)
    return RequestError(400, message, param=param and param + index, code="invalid_value")


def _field_path(location: tuple) -> str | None:
    """FastAPI's error location as a request field, ("body", "promptdistill", "budgets", 0) as
    "promptdistill.budgets[0]"; None for the body as a whole."""
    path = ""
    for part in location[1:] if location and location[0] == "body" else location:
        if _is_union_member(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def _is_union_member(part) -> bool:
    """Whether a location part names the member of a union that failed ("str", "list[TextPart]", "TextPart"),
    not a field: every field of the request models is a lower-case identifier other than a type's name."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or not part.isidentifier() or part[0].isupper()
    )


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":  # FastAPI then reads no JSON at all
        return RequestError(
            400,
            f"the request body must be JSON sent with 'Content-Type: application/json', got "
            f"{content_type or 'no Content-Type'!r}",
            code="invalid_content_type",
        ).response()
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        message = f"the request body is not valid JSON: {reason} (at character {first['loc'][-1]})"
        return RequestError(400, message, code="invalid_json").response()
    param = _field_path(tuple(first["loc"]))
    if first["type"] == "value_error":  # a field's own check (`promptdistill.budgets`): a value out of range
        return RequestError(400, str(first["ctx"]["error"]), param=param, code="invalid_value").response()
    message = f"{param or 'the request body'}: {first['msg']}"
    return RequestError(422, message, param=param, code="invalid_type").response()


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    # Starlette's own refusals: an unknown path (404) or method (405).
    code = "not_found" if error.status_code == 404 else None
    return RequestError(error.status_code, str(error.detail), code=code, headers=error.headers).response()


async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return error.response()


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path, exc_info=error)
    return SERVER_ERROR.response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(Exception, _server_error)

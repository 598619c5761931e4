"""One error model for every Bastion HTTP app.

Every 4xx/5xx answer is ``{"error": {"code", "message", "details"}}`` (the service's
shape; another shape, e.g. the LLM proxy's OpenAI-style ``{"error": {"message", "type",
"param", "code"}}``, is one ``render`` function away). A client's mistake is never a
500: malformed JSON -> 400 ``malformed_json``, a body that does not match the schema
(including out-of-range query parameters such as ``after_id=2**70``) -> 422
``invalid_request`` naming the field, an unknown route -> 404, a wrong method -> 405.

Use::

    from bastion.web.errors import ApiError, install_error_handlers

    install_error_handlers(app, on_error=lambda request, status, code: ...,
                           on_internal=lambda request, exc: ...)
    raise ApiError(404, "unknown_version", "model has no version 7")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "ErrorBody", "ErrorResponse", "error_json", "error_response",
           "install_error_handlers", "ERROR_RESPONSES"]


class ErrorBody(BaseModel):
    """What went wrong: a stable ``code``, a ``message`` naming the problem and, where it
    helps, ``details`` (e.g. the unknown request ids)."""

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer."""

    error: ErrorBody


#: OpenAPI ``responses=`` entries for the statuses every route may answer
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    413: {"model": ErrorResponse, "description": "Body or batch too large"},
    422: {"model": ErrorResponse, "description": "Invalid request"},
}
#: ... and those of a route that needs a role
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No, unknown or revoked API key"},
    403: {"model": ErrorResponse, "description": "The key's role may not do this"},
}


class ApiError(Exception):
    """An error answer: status, code, message, details (and extra headers)."""

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = int(status), code, message
        self.details = details or {}
        self.headers = headers


def error_json(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """The error body as JSON bytes (for pure ASGI code that sends it itself)."""
    return json.dumps({"error": {"code": code, "message": message,
                                 "details": details or {}}}).encode()


def error_response(status: int, code: str, message: str,
                   details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The default renderer: Bastion's error shape."""
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(status_code=status, content=body, headers=headers)


async def send_error(send: Any, status: int, code: str, message: str,
                     details: dict[str, Any] | None = None,
                     headers: dict[str, str] | None = None) -> int:
    """Send an error answer from pure ASGI code; return the status."""
    data = error_json(code, message, details)
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hs += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": data})
    return status


Render = Callable[[int, str, str, dict[str, Any], "dict[str, str] | None"], Response]
OnError = Callable[[Request, int, str], None]
OnInternal = Callable[[Request, BaseException], None]


def validation_error(errs: list[Any], content_type: str) -> tuple[int, str, str,
                                                                   dict[str, Any]]:
    """``(status, code, message, details)`` for pydantic/FastAPI validation errors."""
    bad_json = next((e for e in errs if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        ctx = bad_json.get("ctx") or {}
        return (400, "malformed_json",
                f"request body is not valid JSON: {ctx.get('error', 'parse error')}",
                {"position": (bad_json.get("loc") or [None, None])[-1]})
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in (
            "dict_type", "model_attributes_type", "missing") for e in errs):
        if "json" in content_type:
            return (422, "invalid_request",
                    "request body must be a JSON object, e.g. {\"inputs\": [...]}", {})
        return (400, "malformed_json", "request body is not a JSON object (send JSON with "
                "Content-Type: application/json)", {})
    problems = []
    for e in errs[:20]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append({"field": loc, "problem": msg})
    first = problems[0] if problems else {"field": "", "problem": "invalid request"}
    return (422, "invalid_request", f"{first['field'] or 'request'}: {first['problem']}",
            {"problems": problems})


def install_error_handlers(app: FastAPI, *, render: Render | None = None,
                           on_error: OnError | None = None,
                           on_internal: OnInternal | None = None) -> None:
    """Map every exception to one error answer.

    Args:
        render: ``render(status, code, message, details, headers) -> Response``; default
            :func:`error_response` (Bastion's shape). The LLM proxy passes its
            OpenAI-style renderer.
        on_error: called with ``(request, status, code)`` for every 4xx (e.g. a metrics
            counter by code).
        on_internal: called with ``(request, exc)`` for an unexpected exception (the
            answer is a 500 ``internal_error`` naming only the exception type).
    """
    out: Render = render or error_response

    def answer(request: Request, status: int, code: str, message: str,
               details: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> Response:
        if on_error is not None and status < 500:
            on_error(request, status, code)
        return out(status, code, message, details or {}, headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return answer(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        status, code, message, details = validation_error(
            list(exc.errors()), request.headers.get("content-type", ""))
        return answer(request, status, code, message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(exc.status_code, "http_error")
        msg = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            code, msg = "malformed_json", "request body could not be parsed as JSON"
        return answer(request, exc.status_code, code, msg,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        if on_internal is not None:
            on_internal(request, exc)
        return out(500, "internal_error",
                   f"internal error: {type(exc).__name__} (the service keeps running)", {},
                   None)

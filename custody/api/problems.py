"""RFC 9457 problem+json: the one place where errors become HTTP responses.

No stack trace or exception text from an unexpected error reaches a client; those
get a generic ``internal_error`` and are logged by type.
"""

from __future__ import annotations

import json
import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custody.errors import CustodyError, DatabaseUnavailable, InvalidRequest, NotFound, PayloadTooLarge
from custody.storage.db import is_database_outage

log = logging.getLogger("custody.api")
PROBLEM_JSON = "application/problem+json"
MAX_BODY = 1 << 20
_KNOWN_STATUSES = frozenset(status.value for status in HTTPStatus)


class Problem(BaseModel):
    """An RFC 9457 problem document with a stable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem_response(error: CustodyError, request: Request) -> JSONResponse:
    body = error.to_problem()
    body["instance"] = request.url.path
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 429:
        headers = {"Retry-After": str(max(1, math.ceil(float(error.extra.get("retry_after", 1)))))}
    return JSONResponse(body, status_code=error.status, media_type=PROBLEM_JSON, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only location and message: echoing the input could echo a secret someone pasted.
    return [{"loc": list(err.get("loc", ())), "msg": str(err.get("msg", ""))} for err in exc.errors()]


def install(app: FastAPI) -> None:
    @app.exception_handler(CustodyError)
    async def _custody(request: Request, exc: CustodyError) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(InvalidRequest("the request is not valid", errors=_validation_errors(exc)), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return problem_response(NotFound("no such resource"), request)
        if exc.status_code == 400:  # e.g. a body FastAPI could not parse as JSON
            return problem_response(InvalidRequest(str(exc.detail)), request)
        code = f"http_{exc.status_code}"
        body = {
            "type": f"https://agent-custody.dev/problems/{code}",
            "title": HTTPStatus(exc.status_code).phrase if exc.status_code in _KNOWN_STATUSES else "Error",
            "status": exc.status_code,
            "detail": str(exc.detail),
            "code": code,
            "instance": request.url.path,
        }
        return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON, headers=exc.headers)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return problem_response(InvalidRequest("the JSON document is nested too deeply"), request)

    async def _dependency(request: Request, exc: Exception) -> JSONResponse:
        # Handled here rather than by the catch-all below, which Starlette re-raises to the server.
        if is_database_outage(exc):
            return problem_response(DatabaseUnavailable("the database is unavailable"), request)
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(CustodyError("an internal error occurred"), request)

    for kind in (DBAPIError, SATimeoutError, OSError):
        app.add_exception_handler(kind, _dependency)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_database_outage(exc):
            return problem_response(DatabaseUnavailable("the database is unavailable"), request)
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(CustodyError("an internal error occurred"), request)

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """The OpenAPI document without FastAPI's 422: invalid requests are 400 problems (above)."""
        if app.openapi_schema is None:
            document = generate()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                document.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


class BodyLimit:
    """Refuse request bodies above ``limit`` bytes (declared or streamed) with a 413 problem."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _send_problem(scope, send, PayloadTooLarge(f"request bodies are limited to {self.limit} bytes"))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLarge(f"request bodies are limited to {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_problem(scope: Scope, send: Send, error: CustodyError) -> None:
    body = json.dumps(error.to_problem() | {"instance": scope.get("path", "")}).encode()
    headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""RFC 9457 problem+json: the one place where errors become HTTP responses.

No stack trace or exception text from an unexpected error reaches a client; those
get a generic ``internal_error`` and are logged by type.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from custody.errors import CustodyError, InvalidRequest, NotFound

log = logging.getLogger("custody.api")
PROBLEM_JSON = "application/problem+json"


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
        error = CustodyError(str(exc.detail))
        body = error.to_problem() | {
            "status": exc.status_code,
            "code": f"http_{exc.status_code}",
            "instance": request.url.path,
        }
        return JSONResponse(body, status_code=exc.status_code, media_type=PROBLEM_JSON)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(CustodyError("an internal error occurred"), request)

"""OpenAI's error JSON, for every error the router returns."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InvalidRequestError

log = logging.getLogger(__name__)
_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[\w-]+\[.*\])$")


def error_response(status: int, message: str, param: str | None = None,
                   err_type: str | None = None, code: str | None = None) -> JSONResponse:
    if err_type is None:
        err_type = {400: "invalid_request_error", 404: "not_found_error",
                    503: "service_unavailable_error"}.get(status, "internal_server_error")
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": err_type, "param": param, "code": code}})


def model_not_found(asked: str, served: str) -> JSONResponse:
    """As OpenAI answers a model it does not have: 404, code model_not_found."""
    return error_response(404, f"The model `{asked}` does not exist; this server serves "
                          f"`{served}`.", param="model", err_type="invalid_request_error",
                          code="model_not_found")


class WorkerUnavailableError(RuntimeError):
    """No healthy worker could take the request (HTTP 503)."""


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app returns, in OpenAI's shape: a request that fails validation
    (400, naming the field), a refused one (400), no worker (503), an unknown path or
    method (404/405), and a bug (500, logged with its traceback)."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        # Union members show up in the location ("prompt", "list[int]", 0): drop them, so
        # `param` names the request's own field.
        loc = [str(x) for x in first.get("loc", []) if x != "body" and not (
            isinstance(x, str) and _TYPE_TAG.match(x))]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {msg}")
        return error_response(400, f"{'.'.join(loc) or 'body'}: {msg}",
                              param=".".join(loc) or None)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(request: Request, exc: InvalidRequestError):
        return error_response(400, str(exc), param=exc.param)

    @app.exception_handler(WorkerUnavailableError)
    async def on_unavailable(request: Request, exc: WorkerUnavailableError):
        return error_response(503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail),
                              err_type="invalid_request_error" if exc.status_code < 500
                              else None)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        # Not the client's fault: answered as OpenAI's JSON, not a bare text 500, so
        # clients report a server error.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

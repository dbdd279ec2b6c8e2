"""OpenAI's error JSON, for every error the router returns."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(status: int, message: str, param: str | None = None,
                   err_type: str | None = None, code: str | None = None) -> JSONResponse:
    if err_type is None:
        err_type = {400: "invalid_request_error", 404: "not_found_error",
                    503: "service_unavailable_error"}.get(status, "internal_server_error")
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": err_type, "param": param,
                  "code": code if code is not None else status}})


class WorkerUnavailableError(RuntimeError):
    """No healthy worker could take the request (HTTP 503)."""

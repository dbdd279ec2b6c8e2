"""Errors in a request that the caller can fix (HTTP 400 in the router)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request field is out of range; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

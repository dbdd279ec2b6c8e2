"""Errors a user can act on: each names the file, flag or field that is wrong."""

from __future__ import annotations


class BatonError(Exception):
    """Base of every error Baton raises on purpose (never a deep library traceback)."""


class UnsupportedArchitectureError(BatonError):
    pass


class CheckpointError(BatonError):
    """A checkpoint folder is missing, incomplete or corrupt."""

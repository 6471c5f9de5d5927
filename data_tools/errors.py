"""Errors raised for bad data inputs. All are `ConfigError`s (hence `ValueError`s), so the
command line prints the one-line message instead of a traceback."""

from __future__ import annotations

from nemotron_train.errors import BadInputError, DataError, StaleCacheError

__all__ = ["BadInputError", "DataError", "StaleCacheError"]

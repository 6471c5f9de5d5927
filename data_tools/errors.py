"""Errors raised for bad data inputs. All are `ConfigError`s (hence `ValueError`s), so the
command line prints the one-line message instead of a traceback."""

from __future__ import annotations

from nemotron_train.config.loader import ConfigError


class DataError(ConfigError):
    """A dataset, tokenizer or cache problem the user can fix; the message names the file."""


class BadInputError(DataError):
    """An input record that cannot be read (bad JSON, missing key, wrong type)."""


class StaleCacheError(DataError):
    """The index cache was built from dataset files that have changed since."""

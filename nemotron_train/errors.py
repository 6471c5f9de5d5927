"""The one family of user errors.

Anything a user can fix (a config key, a data file, a checkpoint, a Hugging Face directory)
raises a subclass of `UserError`; its message names what is wrong and how to fix it. The
command line catches `UserError` once (nemotron_train/cli.py): exit code 2, the message
printed once, no traceback, in every launch mode. Internal invariants stay `assert`.
`UserError` derives from `ValueError`, so code that catches ValueError keeps working.
"""

from __future__ import annotations

# Exit code of every user error, in every launch mode (argparse uses 2 for bad arguments too).
USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A problem the user can fix; the message names the key, file or directory and the fix."""


class ConfigError(UserError):
    """A bad config file, key, value or override."""


class DataError(UserError):
    """A dataset, tokenizer or cache problem; the message names the file."""


class BadInputError(DataError):
    """An input record that cannot be read (bad JSON, missing key, wrong type)."""


class StaleCacheError(DataError):
    """The index cache was built from dataset files that have changed since."""


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message names the directory and the fix."""


class HFConversionError(UserError):
    """A Hugging Face directory or weight set that does not match the model."""


class ScoreError(HFConversionError):
    """Bad input to `nemotron-train score`."""


class LaunchError(UserError):
    """A launcher option or environment (sbatch options, SLURM variables, host lists) that
    cannot be used; the message names the option or variable."""

"""Project-wide exception types.

The input errors subclass `ValueError` so callers that only care about "bad input" can catch one type, while
code that wants to tell a broken checkpoint from a bad config can catch the specific one. Failures of a run
itself (a diverging loss) are `RuntimeError`s.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration (a model's config.json, a run's YAML) lacks a field or holds an unsupported value."""


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, unreadable, or does not match the model it is loaded into."""


class UserError(Exception):
    """A problem the user can fix from the command line (the CLI reports it in one line, no traceback)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and every loss term, and the last good
    checkpoint is left as it was."""

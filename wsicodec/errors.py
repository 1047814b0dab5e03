"""Errors that reach the user as one line.

Anything raised as a :class:`WsicodecError` is printed by the CLI as ``error: <message>``
with a non-zero exit and no traceback. Other exceptions are bugs and keep their traceback.
"""


class WsicodecError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class SlideError(WsicodecError):
    """The source slide is missing, unreadable or lacks what we need (e.g. resolution)."""


class ModelError(WsicodecError):
    """A model name is unknown or its weights cannot be loaded."""


class ContainerError(WsicodecError):
    """A .pzarr container is missing, truncated, foreign or of an unsupported version."""


class OutputExistsError(WsicodecError):
    """The output path exists and --overwrite was not given."""

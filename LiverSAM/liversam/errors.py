"""Exceptions that carry a message a user can act on (which file, what is wrong, what to do)."""

from __future__ import annotations


class LiverSAMError(Exception):
    """Base class of every error LiverSAM raises on purpose. The CLI prints it and exits non-zero."""


class InputImageError(LiverSAMError):
    """The CT (file, folder or array) cannot be used."""


class PromptError(LiverSAMError):
    """A prompt (point, box, prompts file) is malformed or lies outside the volume."""


class ModelError(LiverSAMError):
    """A model name, checkpoint file or device cannot be used."""


class OutputError(LiverSAMError):
    """An output cannot be written (unknown format, geometry mismatch, ...)."""


class Cancelled(Exception):  # noqa: N818 - a user action, not an error
    """The user cancelled a long operation; nothing was written."""

"""User-facing errors: one line on stderr and an exit code, never a traceback (unless SHARP_DEBUG=1)."""

from __future__ import annotations


class SharpError(Exception):
    """A failure the user can act on. The message is printed as one line; exit code 1."""

    exit_code = 1


class UsageError(SharpError):
    """Bad flags or arguments (exit code 2, like the shell's usage errors)."""

    exit_code = 2


class VideoError(SharpError):
    """The video cannot be opened, decoded or sampled."""


class ModelError(SharpError):
    """The model cannot be found, loaded or is not a supported video LLM."""


class DeviceError(SharpError):
    """The requested device or quantization is not available here."""


def one_line(message: str, limit: int = 400) -> str:
    """Collapse a message to a single line so scripts can grep it."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

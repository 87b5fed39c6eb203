"""User-facing errors: one line on stderr and an exit code, never a traceback (unless SHARP_DEBUG=1).

The failure policy, in one place: a command's failure is one line and an exit code (cli.py); one
item's failure inside a run of many (a `sharp eval` cell, a `sharp batch` line, a served request)
is one line recorded for that item, and the run goes on (`item_failure`); after running out of GPU
memory the allocator's cache is given back before the next item (`release_gpu_memory`);
SHARP_DEBUG=1 turns both back into tracebacks (`debug_enabled`).
"""

from __future__ import annotations

import errno
import os


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


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying so (older kernels, bitsandbytes)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def describe(exc: Exception) -> str:
    """An unexpected exception as one line: out-of-memory gets advice, a failed file operation the
    system's words and the file (a full disk: what to do), anything else its type."""
    if is_out_of_memory(exc):
        return ("out of GPU memory; lower --frames, --max-pixels or --ratio, or use --quant nf4 "
                f"({one_line(str(exc), 160)})")
    if isinstance(exc, OSError) and exc.strerror:
        where = f": '{exc.filename}'" if exc.filename else ""
        advice = "; free some space and run again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"{exc.strerror}{where}{advice}"
    return f"{type(exc).__name__}: {exc} (SHARP_DEBUG=1 shows the traceback)"


def debug_enabled() -> bool:
    """SHARP_DEBUG set to anything but "" or "0": show tracebacks instead of one-line errors."""
    return os.environ.get("SHARP_DEBUG") not in (None, "", "0")


def item_failure(exc: Exception) -> tuple[str, bool]:
    """(the one line recorded for an item that failed, whether it ran out of GPU memory): a
    SharpError is its own message; anything else is described (out of memory with advice), or
    re-raised under SHARP_DEBUG so its traceback shows. When it ran out of memory, call
    release_gpu_memory() after the except block, once the traceback's frames are gone. Used by
    `sharp eval` (a cell), `sharp batch` (an item) and `sharp serve` (a request's log line)."""
    if isinstance(exc, SharpError):
        return one_line(str(exc)), False
    if debug_enabled():
        raise exc
    return one_line(describe(exc)), is_out_of_memory(exc)


def release_gpu_memory() -> None:
    """After running out of GPU memory: collect what the failed call left and give the allocator's
    cached blocks back, so the next call starts from what the model itself holds. Call it outside
    the except block, once the traceback's frames (and their tensors) are gone."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()  # a no-op when CUDA was never initialised

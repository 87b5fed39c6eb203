"""decord2 (the `decord` module) as sharp's fast frame reader, with the guards its quirks need.

decord2 3.4 decodes on a thread of its own. To reach a frame it skips forward from a keyframe,
polling that thread; after 10,000 empty polls it gives up, logs "Failed to skip frames
effectively ... Aborting skip operation" on stderr and carries on from the wrong place, so
get_batch returns wrong frames with no error. A busy CPU is enough to starve the decoder
thread that long (tests/test_decord_read.py reproduces it with CPU-burning processes). Its Python
API gives no frame timestamps to check, so sharp watches stderr during get_batch for that line:
seen, the batch is thrown away (auto mode reads the file with PyAV instead).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import numpy as np

# decord's own words when its skip loop gives up (video_reader.cc, SkipFramesImpl).
SKIP_FAILURE = b"Failed to skip frames effectively"
ATTEMPTS = 3  # forced --decoder decord: fresh readers tried before giving up


class LostPlace(RuntimeError):
    """decord said it aborted a skip, so the frames it returned cannot be trusted."""

    def __init__(self):
        super().__init__("it lost its place while skipping frames (a busy CPU starves its decoder thread)")


def import_decord():
    # decord2's bundled libraries break torch's CPU BLAS (segfaults in linear layers) when they
    # are loaded first; loading torch first is safe. Seen with decord2 3.4.0 and torch 2.14.1.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    import decord

    return decord


# fd 2 belongs to the whole process: one watch at a time. Two threads that each swapped it for a
# pipe of their own (serve decodes two videos at once) restored each other's pipe, not stderr: the
# server's log was lost from then on, and its exit status after SIGINT with it.
_one_at_a_time = threading.Lock()


@contextmanager
def watch_stderr(marker: bytes):
    """Route file descriptor 2 through a pipe while the block runs: everything is passed on to the
    real stderr as it comes, except whole lines holding `marker`, which are kept out and counted
    in the yielded list. Native code writes to fd 2 directly, so sys.stderr cannot see it. Blocks
    in other threads wait for this one: a marker line is then always the block's own decoder's."""
    with _one_at_a_time:
        with _watch(marker) as seen:
            yield seen


@contextmanager
def _watch(marker: bytes):
    seen: list[bytes] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to watch
        yield seen
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        held = b""  # a line that began with "[" (decord's log format) and has not ended yet
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            held += chunk
            *lines, held = held.split(b"\n")
            for line in lines:
                if marker in line:
                    seen.append(line)
                else:
                    _write_all(saved, line + b"\n")
            if held and not held.startswith(b"["):  # a progress line of someone else: pass it on now
                _write_all(saved, held)
                held = b""
        if held:
            if marker in held:
                seen.append(held)
            else:
                _write_all(saved, held)

    thread = threading.Thread(target=forward, name="sharp-stderr-watch", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end, so the thread sees the end
        thread.join(timeout=5)
        os.close(read_end)
        os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return


def read_batch(vr, indices: list[int], reopen=None, attempts: int = 1) -> tuple[np.ndarray, int]:
    """(frames at `indices`, uint8 T x H x W x 3; how many attempts hit the skip failure first),
    from reader `vr`, then from `reopen()` (a fresh reader) up to `attempts` in all; LostPlace
    when every one failed."""
    for attempt in range(attempts):
        if attempt:
            vr = reopen()
        with watch_stderr(SKIP_FAILURE) as seen:
            batch = vr.get_batch(indices)
        vr.seek(0)  # else decord keeps the batch's decoder buffers alive (known memory blow-up)
        if not seen:
            return (batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)), attempt
    raise LostPlace()

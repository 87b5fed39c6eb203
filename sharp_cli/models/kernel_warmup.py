"""Triton's once-per-process set-up, done beside the weights' load instead of in the first question.

Why: the first launch of any Triton kernel in a process computes `triton_key()`, a SHA-256 of
Triton's own compiler sources and of libtriton (hundreds of MB), before it can look a kernel up in
its on-disk cache. `python -m research.first_question` on an H200 (bf16, 4 frames,
research/results/h200-first-question-*.txt) found 0.38 s of a 1.67 s first question in that hash
alone, and none of it in the second question: sharp's kernels (fused_step, fused_vision, gemv) are
Triton, stock transformers runs none. A thread started before from_pretrained computes the key while
the weights load (seconds of I/O; hashlib lets go of the GIL on large buffers), and load() waits for
it before returning, so the first question finds it cached (`functools.lru_cache` in Triton).

A warm-up, nothing more: any failure (another Triton without the function, an unreadable file) is
ignored, and the first launch then pays the hash as before.
"""

from __future__ import annotations

import threading

JOIN_SECONDS = 30.0  # past this, load() goes on; the first launch then computes the key itself


def _key_function():
    """Triton's cached cache-key function, where this Triton has it (3.x: triton.runtime.cache)."""
    try:
        from triton.runtime import cache
    except ImportError:
        return None
    return getattr(cache, "triton_key", None)


def _run(key_function) -> None:
    try:
        key_function()
    except Exception:  # noqa: BLE001 - a warm-up: the first kernel launch computes it instead
        pass


def start(device) -> threading.Thread | None:
    """A started daemon thread computing Triton's key, when sharp will launch Triton kernels on
    `device` (CUDA, a kernel switched on); None otherwise."""
    if device.type != "cuda" or not _uses_triton(device):
        return None
    key_function = _key_function()
    if key_function is None:
        return None
    thread = threading.Thread(target=_run, args=(key_function,), name="sharp-triton-warmup", daemon=True)
    thread.start()
    return thread


def finish(thread: threading.Thread | None) -> None:
    """Wait for start()'s thread (bounded): two threads computing the key at once would each hash."""
    if thread is not None:
        thread.join(JOIN_SECONDS)


def _uses_triton(device) -> bool:
    from sharp_cli.models import fused_step, fused_vision, gemv, gemv_nf4

    return any(kind.available(device) for kind in (fused_step, fused_vision, gemv, gemv_nf4))

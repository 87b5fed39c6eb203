"""One item of `sharp batch`: its frames, its answer, its output line and its line on stderr.

Shared by batch.py (one item at a time) and batch_together.py (items decoded together), which must
write the same lines and say the same things.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


class Progress:
    """One line per item on stderr, so that a log of the run reads well too."""

    def __init__(self, quiet: bool, total: int | None):
        self.quiet, self.total, self.count = quiet, total, 0
        self.answered = self.failed = self.skipped = 0

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"sharp batch: {text}\n")
            sys.stderr.flush()

    def item(self, item_id, outcome: str) -> None:
        self.count += 1
        where = f"{self.count}/{self.total}" if self.total else str(self.count)
        self.say(f"[{where}] {item_id}: {outcome}")

    def summary(self, output: str | None) -> None:
        earlier = f", {self.skipped} answered in {output} before" if self.skipped else ""
        self.say(f"{self.answered} answered, {self.failed} failed{earlier}")


def outcome(progress: Progress, item_id, record: dict | None, error: str | None, seconds: float) -> dict:
    """The output line of one item (its answer record or its error), counted and said on stderr."""
    from sharp_cli.report import count

    if error is not None:
        progress.failed += 1
        progress.item(item_id, f"error: {error}")
        return {"id": item_id, "error": error}
    progress.answered += 1
    progress.item(item_id, f"ok ({count(record['new_tokens'], 'token')}, {seconds:.1f} s)")
    return {"id": item_id, **record}


def answer_item(loaded, item, defaults, base: Path, store, progress: Progress, cache=None):
    """(the ask --json record, None) or (None, the one-line error)."""
    from sharp_cli import answer as answer_mod

    failure = None
    try:
        plan, clip, video_s = prepare_item(loaded, item, defaults, base, progress, cache)
        answer = answer_mod.ask(loaded, clip, prompt_of(item), plan.cfg, max_new_tokens=plan.max_new_tokens,
                                max_pixels=plan.video.get("max_pixels"), store=store, sampling=plan.sampling,
                                cache=cache)
        return answer_record(loaded, item, clip, plan, answer, video_s), None
    except Exception as exc:  # noqa: BLE001 - one item's failure must not end the run
        failure = exc
    return None, error_line(failure)


def prompt_of(item) -> str:
    """What the model is asked: the question, or with options the multiple-choice prompt `sharp eval`
    asks in our own format (the question, "A. option" lines, the instruction to answer with a letter)."""
    from sharp_cli.letters import build_prompt

    return build_prompt(item.question, item.options) if item.options else item.question


def answer_record(loaded, item, clip, plan, answer, video_s: float) -> dict:
    """The item's output line (less its id): the ask --json object, and for an item with options the
    letter its answer gives beside it ("prediction", as `sharp eval` reads it; None when it names none)."""
    from sharp_cli import report
    from sharp_cli.letters import parse_letter

    record = report.ask_record(loaded, clip, plan.cfg, answer)
    if item.options:
        record = {"answer": record.pop("answer"), "prediction": parse_letter(answer.text, item.options), **record}
    return {**record, "video_seconds": video_s}


def prepare_item(loaded, item, defaults, base: Path, progress, cache=None):
    """(plan, clip, seconds decoding took) of an item: its options over the defaults, its frames
    (a clip over the model's context refused before it is decoded, and decoded no larger than the
    model keeps)."""
    from sharp_cli.clip_budget import ClipBudget
    from sharp_cli.overrides import resolve
    from sharp_cli.video import load_video, probe

    plan = resolve(item, defaults, loaded)
    path, started = base / os.path.expanduser(item.video), time.perf_counter()
    fit, limits = ClipBudget.of(loaded), dict(question=prompt_of(item), max_new_tokens=plan.max_new_tokens)
    info = probe(path)
    video = fit.plan(info, plan.video, **limits)
    clip = cache.load_video(path, **video) if cache is not None else load_video(path, **video)
    fit.check_clip(clip, plan.video.get("max_pixels"), info, **limits)
    video_s = time.perf_counter() - started
    for note in clip.notes:
        progress.say(f"note: {item.video}: {note}")
    return plan, clip, video_s


def error_line(exc: BaseException) -> str:
    """The one-line error of an item that failed (called once the except block is left: the
    traceback, and the tensors it holds, must be gone before GPU memory is given back)."""
    from sharp_cli.errors import UsageError, item_failure, release_gpu_memory
    from sharp_cli.overrides import as_field_names

    message, out_of_memory = item_failure(exc)  # SHARP_DEBUG=1: raised here
    if isinstance(exc, UsageError):  # a bad option of this item: named as the item's field
        return as_field_names(message)
    if out_of_memory:
        exc.__traceback__ = None
        release_gpu_memory()
    return message

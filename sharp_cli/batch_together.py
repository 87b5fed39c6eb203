"""`sharp batch --max-batch N` (N > 1): the items answered together by the scheduler, their lines
still written in input order.

The next items' videos are decoded, and their frames put through the model's processor, ahead in
threads (prefetch.py, at most PREFETCH_DEPTH at a time), so that a request is ready when a slot of
the batch frees; the scheduler takes one only when
it could start. Answers end out of order; each waits until every line before it is written (at
most the answers in flight wait), so the output reads like a one-at-a-time run's and a rerun with
--output resumes the same way.
"""

from __future__ import annotations

from sharp_cli import jsonl
from sharp_cli.batch_items import answer_record, error_line, outcome, prepare_item, prompt_of

PREFETCH_DEPTH = 8  # videos prepared ahead of the scheduler (bounded: their frames and pixels are in memory)
PREFETCH_WORKERS = 2


def run(loaded, entries, defaults, base, sink, progress, store, cache, max_batch: int, kv_gb: float | None) -> None:
    """Answer every (id, item, error) of `entries`, writing each line to `sink` in order."""
    from sharp_cli import answer, prefetch
    from sharp_cli.scheduler import Request, Scheduler

    scheduler = Scheduler(loaded, max_batch=max_batch, kv_bytes=int(kv_gb * 2**30) if kv_gb else None,
                          store=store, cache=cache)
    lines = _InOrder(sink, progress)

    def prepare(entry):  # in a prefetch thread: the frames, then the processor's work on them
        _, item, error = entry
        if error is not None:
            return None
        plan, clip, video_s = prepare_item(loaded, item, defaults, base, progress, cache)
        inputs = answer.inputs_ahead(loaded, clip, prompt_of(item), plan.video.get("max_pixels"), cache)
        return plan, clip, video_s, inputs

    def requests():
        decoded = prefetch.ahead(entries, prepare, workers=PREFETCH_WORKERS, depth=min(max_batch, PREFETCH_DEPTH))
        for (item_id, item, error), prepared, failure in decoded:
            index = lines.expect(item_id)
            if error is None and failure is not None:
                error = error_line(failure)
            if error is not None:
                lines.done(index, None, error, 0.0)
                continue
            plan, clip, video_s, inputs = prepared
            yield Request(clip, prompt_of(item), plan.cfg, max_new_tokens=plan.max_new_tokens,
                          max_pixels=plan.video.get("max_pixels"), sampling=plan.sampling,
                          tag=(index, item, clip, plan, video_s), inputs=inputs)

    for done in scheduler.run(requests()):
        index, item, clip, plan, video_s = done.request.tag
        if done.error is not None:
            lines.done(index, None, error_line(done.error), 0.0)
        else:
            record = answer_record(loaded, item, clip, plan, done.answer, video_s)
            lines.done(index, record, None, video_s + done.answer.seconds)
        lines.flush()
    lines.flush()


class _InOrder:
    """Output lines written in input order as their items end (in any order)."""

    def __init__(self, sink, progress):
        self.sink, self.progress = sink, progress
        self.ids: list = []
        self.ended: dict[int, tuple] = {}
        self.written = 0

    def expect(self, item_id) -> int:
        self.ids.append(item_id)
        return len(self.ids) - 1

    def done(self, index: int, record, error, seconds: float) -> None:
        self.ended[index] = (record, error, seconds)

    def flush(self) -> None:
        while self.written in self.ended:
            record, error, seconds = self.ended.pop(self.written)
            jsonl.append(self.sink, outcome(self.progress, self.ids[self.written], record, error, seconds))
            self.written += 1

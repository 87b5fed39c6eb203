"""`sharp eval --max-batch N` (N > 1): the cells of the items answered together by the scheduler.

The same answers and lines as runner.run, in the same order: per item its unpruned reference
first (a 1-token answer when the `none` cell was answered in an earlier run), then its cells.
The next items' videos are decoded (and their frames put through the processor) ahead in threads
(prefetch.py); answers end out of order and
each line waits until every line before it is written, so a pruned line always finds its item's
reference logits, and an interrupted run resumes as a one-at-a-time run does. Failures follow
runner.run's policy: a broken video's cells get error lines; a cell that fails otherwise gets an
error line marked `retry` (errors.item_failure), and the run goes on.
"""

from __future__ import annotations

from sharp_cli import jsonl
from sharp_cli.errors import VideoError, item_failure, one_line
from sharp_cli.evaluate.records import UNPRUNED, cell_config, needle_tokens, prompt_for, results_line

PREFETCH_DEPTH = 4  # items whose frames are decoded ahead (bounded: they are in memory)


class _Item:
    def __init__(self, item, clip):
        self.item, self.clip = item, clip
        self.reference = None  # unpruned prefill logits
        self.needle, self.mapped = None, not item.needle_boxes


def run(loaded, job, todo, progress=None, cache=None, store=None) -> int:
    """runner.run's contract: answer every pending cell, append its line; returns lines written."""
    from sharp_cli import answer as answer_mod
    from sharp_cli import prefetch
    from sharp_cli.scheduler import Request, Scheduler

    scheduler = Scheduler(loaded, max_batch=job.max_batch, store=store, cache=cache,
                          kv_bytes=int(job.kv_gb * 2**30) if job.kv_gb else None)
    compare = UNPRUNED in job.cells
    units: list = []  # (kind, _Item, cell, record or None), in the order lines are written
    ended: dict[int, object] = {}  # unit -> answer
    written = 0

    def ask(state: _Item, kind: str, cell, tokens: int, cfg, inputs=None):
        units.append((kind, state, cell, None))
        return Request(state.clip, prompt_for(state.item), cfg, max_new_tokens=tokens,
                       max_pixels=job.video.get("max_pixels"), tag=len(units) - 1, inputs=inputs)

    def load(entry):  # in a prefetch thread: the frames, then the processor's work for the first cell
        clip = cache.load_video(entry[0].video, **job.video)
        try:
            inputs = answer_mod.inputs_ahead(loaded, clip, prompt_for(entry[0]), job.video.get("max_pixels"), cache)
        except Exception:  # noqa: BLE001 - left to the cell's own begin, which fails it by runner.run's policy
            inputs = None
        return clip, inputs

    def requests():
        for (item, cells), prepared, failure in prefetch.ahead(todo, load, depth=PREFETCH_DEPTH):
            if failure is not None:
                if not isinstance(failure, VideoError):
                    raise failure
                for cell in cells:  # a broken file stays broken: record it, count it wrong, go on
                    record = results_line(job, item, cell, error=one_line(str(failure), 300))
                    units.append(("line", None, cell, record))
                    ended[len(units) - 1] = None
                continue
            clip, inputs = prepared
            state = _Item(item, clip)
            if compare and UNPRUNED not in cells:
                yield ask(state, "reference", UNPRUNED, 1, cell_config(loaded, job, UNPRUNED), inputs)
                inputs = None  # the later cells find the video's vision output cached
            for cell in sorted(cells, key=lambda c: c[0] != "none"):  # the reference first
                yield ask(state, "cell", cell, job.max_new_tokens, cell_config(loaded, job, cell), inputs)
                inputs = None

    next_unit = 0
    with jsonl.open_for_append(job.output) as handle:
        def flush():
            nonlocal written, next_unit
            while next_unit in ended:
                answer = ended.pop(next_unit)
                kind, state, cell, record = units[next_unit]
                next_unit += 1
                if kind == "reference":
                    state.reference = answer.prefill.logits if answer is not None else None
                    continue
                if kind == "cell":
                    if cell[0] == "none":
                        state.reference = answer.prefill.logits
                    if not state.mapped:  # the same video, so the same tokens, in every cell
                        state.needle = needle_tokens(loaded, state.item, state.clip, answer.encoded.layout)
                        state.mapped = True
                    record = results_line(job, state.item, cell, answer=answer, reference=state.reference,
                                            needle=state.needle)
                jsonl.append(handle, record)
                written += 1
                if progress is not None:
                    progress()

        for done in scheduler.run(requests()):
            tag = done.request.tag
            if done.error is not None:  # one cell's failure must not end the run (memory: freed by the scheduler)
                message, _ = item_failure(done.error)  # SHARP_DEBUG=1: raised here
                kind, state, cell, _ = units[tag]
                if kind == "cell":
                    units[tag] = ("line", state, cell, results_line(job, state.item, cell, error=message, retry=True))
            ended[tag] = done.answer if done.error is None else None
            flush()
        flush()
    return written

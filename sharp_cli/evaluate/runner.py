"""Run methods x ratios x seeds over the items with one loaded model; resume, shard, merge.

A cell is (method, ratio, seed). Every score-based method (sharp, fastv, evs, ...) runs under
`tie_seeds` seeds: PruneConfig.seed drives the permutation that breaks exact ties in its scores;
`random` runs under `random_seeds` seeds; `none` once (seed 0). The run goes in two phases:
first every item's first-seed cells (and every seed of random), then the later seeds; a cell
whose first seed tied nothing on any item (tie audit 0 everywhere: its later seeds would give
the same answers) skips its later seeds in a single-process run.

The results file is JSON lines, one per (item, method, ratio, seed), appended and flushed as each
answer comes, so an interrupted run loses at most the answer in flight. A rerun skips every
cell already in the file; a half-written last line is cut off and redone. Every line carries the
run's settings; resuming with other settings is refused, and so is a file written before lines
carried their seed (its selection broke ties another way).

Sharding: with RANK and WORLD_SIZE set (torchrun, accelerate launch), rank r takes
items[r::world] and appends to its own `<results>.rank{r}`. Rank 0 then waits for every
rank's lines (a gloo barrier when the launcher gives MASTER_ADDR/MASTER_PORT, then the files
themselves, up to a timeout) and appends what the results file lacks, in item-then-cell
order, so the merged file matches a single-process run. Shard files go once merged. Sharded
runs answer every seed (a rank cannot see the other ranks' ties).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sharp_cli import jsonl
from sharp_cli.errors import SharpError, UsageError, VideoError, one_line
from sharp_cli.evaluate.records import UNPRUNED, cell_config, needle_tokens, prompt_for, results_line

POLL_SECONDS = 1.0
UNSEEDED = ("none",)  # methods whose answer no seed changes: one cell, seed 0
RANDOM = "random"  # its seed draws the kept set itself: random_seeds cells


@dataclass
class Job:
    items: list  # every item of the run (all ranks), in order
    cells: list[tuple[str, float, int]]  # (method, ratio, seed) in order
    base: object  # PruneConfig; method, ratio and seed are replaced per cell
    results: Path
    settings: dict  # what must match for a line to be reused
    video: dict  # load_video keyword arguments: frames, fps, max_frames, max_pixels, backend
    max_new_tokens: int = 8
    rank: int = 0
    world: int = 1
    cache_gb: float = 4.0  # the per-video cache: nothing is recomputed per cell that a cell before computed
    skip_untied: bool = True  # skip later seeds of a cell that tied nothing (single-process runs only)
    max_batch: int = 1  # > 1: cells decoded together (together.py); the same answers, so not a setting
    kv_gb: float | None = None  # their KV cache budget (None: the scheduler's default)

    @property
    def my_items(self) -> list:
        return self.items[self.rank:: self.world]

    @property
    def output(self) -> Path:
        return self.results if self.world == 1 else shard_path(self.results, self.rank)


def plan_cells(methods: list[str], ratios: list[float], tie_seeds: int = 1, random_seeds: int = 1,
               first_seed: int = 0) -> list[tuple[str, float, int]]:
    """`none` once at ratio 1.0 (seed 0), then every other method at every ratio, each under its
    seeds: first_seed.. (tie_seeds of them, random_seeds for random); repeats dropped."""
    cells = [("none", 1.0, 0)] if "none" in methods else []
    for m in methods:
        if m in UNSEEDED:
            continue
        count = random_seeds if m == RANDOM else tie_seeds
        cells += [(m, round(float(r), 6), first_seed + s) for r in ratios for s in range(count)]
    return list(dict.fromkeys(cells))


def first_seeds(cells) -> dict[tuple[str, float], int]:
    """(method, ratio) -> the first seed it runs under."""
    first: dict[tuple[str, float], int] = {}
    for method, ratio, seed in cells:
        first.setdefault((method, ratio), seed)
    return first


def is_later(cell, first: dict) -> bool:
    """A second or later seed of a tie-seeded method: answered in the second phase."""
    method, ratio, seed = cell
    return method != RANDOM and seed != first[(method, ratio)]


def key(item_id, method: str, ratio, seed) -> tuple:
    return str(item_id), str(method), round(float(ratio), 6), int(seed)


def line_key(record: dict) -> tuple:
    return key(record["item"], record["method"], record["ratio"], record["seed"])


def untied(records: dict, item_ids, method: str, ratio: float, seed: int) -> bool:
    """Whether the (method, ratio, seed) answers of every item are in `records` (a key -> record
    dict) and none tied (tie_share exactly 0; an answer without a tie audit counts as tied, one
    that failed on its video as untied: later seeds cannot change it)."""
    for item_id in item_ids:
        record = records.get(key(item_id, method, ratio, seed))
        if record is None or (not record.get("error") and record.get("tie_share") != 0):
            return False
    return True


def distributed() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched that way."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world


# -- the results file ------------------------------------------------------------------------------
def shard_path(results: Path, rank: int) -> Path:
    return results.with_name(f"{results.name}.rank{rank}")


def shard_files(results: Path) -> list[Path]:
    prefix = f"{results.name}.rank"
    return sorted(p for p in results.parent.glob(prefix + "*") if p.name[len(prefix):].isdigit())


def read_results(path: Path) -> list[dict]:
    """The complete lines of a results file; an unfinished last line (no newline yet) is left out."""
    return [r for r in jsonl.complete_records(path) if {"item", "method", "ratio"} <= r.keys()]


def done_records(job: Job) -> dict:
    """key -> line already answered in the results file or any shard file, after checking that each
    line has a seed and the run's settings."""
    settings = json.loads(json.dumps(job.settings))
    done = {}
    for path in [job.results, *shard_files(job.results)]:
        for record in read_results(path):
            if "seed" not in record:
                raise UsageError(f"{path} was written by an older sharp eval (its answers carry no tie seed, "
                                 "and ties were broken by index order); pass another --output, or remove that "
                                 "file to start over")
            if record.get("settings") != settings:
                changed = differences(record.get("settings"), settings)
                raise UsageError(f"{path} holds results of other settings ({changed}); pass another --output, "
                                 "or remove that file to start over")
            if not record.get("retry"):  # a cell that failed (not on its video) is answered again
                done.setdefault(line_key(record), record)
    return done


def differences(old, new, limit: int = 4) -> str:
    """What differs between two settings dicts, leaf by leaf: "layer: 2 there, 6 now; ..."."""
    if not isinstance(old, dict):
        return "no settings recorded"
    found = []

    def walk(a, b):
        for name in sorted(set(a) | set(b), key=str):
            x, y = a.get(name), b.get(name)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y)
            elif x != y:
                found.append(f"{name}: {_short(x) if name in a else 'absent'} there, "
                             f"{_short(y) if name in b else 'absent'} now")

    walk(old, new)
    more = f"; and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more if found else "same"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def pending(job: Job, later: bool = False) -> list[tuple[object, list[tuple[str, float, int]]]]:
    """(item, cells still to answer) for this rank's items that have any: the first phase's cells,
    or with later=True the later seeds (less those of cells whose first seed tied nothing, in a
    single-process run)."""
    done = done_records(job)
    first = first_seeds(job.cells)
    cells = [c for c in job.cells if is_later(c, first) == later]
    if later and job.skip_untied and job.world == 1:
        ids = [item.id for item in job.my_items]
        skipped = {(m, r) for (m, r), s in first.items() if untied(done, ids, m, r, s)}
        cells = [c for c in cells if c[:2] not in skipped]
    todo = []
    for item in job.my_items:
        mine = [c for c in cells if key(item.id, *c) not in done]
        if mine:
            todo.append((item, mine))
    return todo


# -- answering -------------------------------------------------------------------------------------
def run(loaded, job: Job, todo, progress=None, cache=None, store=None) -> int:
    """Answer every pending cell: one video decode per item, answer.ask per cell. Returns lines written.

    Pruned lines carry their first-token agreement with the unpruned answer of the same item: from
    the `none` cell answered just before, or, when that one was answered earlier (a resumed run, or
    the first phase of this one), from one unpruned prefill redone here (logits are not stored in
    the results file). A video that cannot be decoded gets an error line per cell, kept by later
    runs (a broken file stays broken); a cell that fails otherwise (out of memory, ...) gets an
    error line marked `retry`, which the next run answers again (errors.item_failure), and the run
    goes on. cache, store: a VideoCache and PriorStore to share between calls."""
    from sharp_cli import answer as answer_mod
    from sharp_cli.prune.prior import PriorStore
    from sharp_cli.video_cache import VideoCache

    store = store if store is not None else PriorStore()
    # Every cell of an item asks about the same video: its frames, vision output and the prompt's
    # start (for each K and segment setting) are computed once per item, not once per cell.
    cache = cache if cache is not None else VideoCache(int(job.cache_gb * 2**30))
    if (job.max_batch or 1) > 1:
        from sharp_cli.evaluate import together

        return together.run(loaded, job, todo, progress, cache, store)
    written = 0
    compare = UNPRUNED in job.cells

    def wrote(record: dict) -> None:
        nonlocal written
        jsonl.append(handle, record)
        written += 1
        if progress is not None:
            progress()

    with jsonl.open_for_append(job.output) as handle:
        for item, cells in todo:
            try:
                clip = cache.load_video(item.video, **job.video)
            except VideoError as exc:  # a broken file stays broken: record it, count it wrong, go on
                for cell in cells:
                    wrote(results_line(job, item, cell, error=one_line(str(exc), 300)))
                continue
            prompt = prompt_for(item)
            ask = lambda cfg, tokens: answer_mod.ask(loaded, clip, prompt, cfg, max_new_tokens=tokens,  # noqa: E731
                                                     max_pixels=job.video.get("max_pixels"), store=store,
                                                     cache=cache)
            reference = needle = None
            mapped = not item.needle_boxes  # needle tokens: mapped once per item, at its first answer
            if compare and UNPRUNED not in cells:
                reference, _ = _attempt(lambda: ask(cell_config(loaded, job, UNPRUNED), 1))
                reference = reference.prefill.logits if reference is not None else None
            for cell in sorted(cells, key=lambda c: c[0] != "none"):  # the reference first
                method, ratio, seed = cell
                answer, error = _attempt(lambda: ask(cell_config(loaded, job, cell), job.max_new_tokens))
                if answer is None:
                    wrote(results_line(job, item, cell, error=error, retry=True))
                    continue
                if method == "none":
                    reference = answer.prefill.logits
                if not mapped:  # the same video, so the same tokens, in every cell
                    needle, mapped = needle_tokens(loaded, item, clip, answer.encoded.layout), True
                wrote(results_line(job, item, cell, answer=answer, reference=reference, needle=needle))
    return written


def _attempt(call):
    """(call(), None), or (None, the one-line error) when it fails: one cell's failure must not end
    the run (errors.item_failure; SHARP_DEBUG=1 re-raises). Ctrl-C is not a failure: it stops."""
    from sharp_cli.errors import item_failure, release_gpu_memory

    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's error line
        message, oom = item_failure(exc)
    if oom:  # here, not in the except block: by now the traceback (and the tensors it holds) is gone
        release_gpu_memory()
    return None, message


# -- sharding --------------------------------------------------------------------------------------
class Group:
    """A gloo process group for the final barrier, when the launcher set one up (or gave its address)."""

    def __init__(self, world: int, timeout: float):
        self.dist = None
        self.owned = False
        if world < 2:
            return
        import torch.distributed as dist

        if not dist.is_available():
            return
        if not dist.is_initialized() and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
            self.owned = True
        self.dist = dist if dist.is_initialized() else None

    def barrier(self) -> None:
        if self.dist is not None:
            try:
                self.dist.barrier()
            except RuntimeError as exc:
                raise SharpError(f"the ranks did not all finish ({one_line(str(exc), 200)}); "
                                 "run again to resume") from None

    def close(self) -> None:
        if self.owned and self.dist is not None:
            self.dist.destroy_process_group()


def wait_for_shards(job: Job, timeout: float) -> list[int]:
    """Rank 0: wait until every rank's lines are on disk; returns the ranks still missing at the timeout."""
    expected = {r: {key(item.id, *c) for item in job.items[r:: job.world] for c in job.cells}
                for r in range(job.world)}
    deadline = time.monotonic() + timeout
    while True:
        present = {line_key(rec) for path in [job.results, *shard_files(job.results)] for rec in read_results(path)}
        missing = [r for r, keys in expected.items() if not keys <= present]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(POLL_SECONDS)


def merge(job: Job, remove_shards: bool = True) -> int:
    """Append the shard lines the results file lacks, in item-then-cell order; returns how many."""
    have = {line_key(rec) for rec in read_results(job.results) if not rec.get("retry")}
    shards = shard_files(job.results)
    new = {}
    for path in shards:
        for record in read_results(path):
            k = line_key(record)
            if k not in have and (k not in new or new[k].get("retry")):  # an answer replaces a failure
                new[k] = record
    position = {key(item.id, *c): (i, j) for i, item in enumerate(job.items) for j, c in enumerate(job.cells)}
    ordered = sorted(new.values(), key=lambda rec: position.get(line_key(rec), (len(job.items), 0)))
    with jsonl.open_for_append(job.results) as handle:  # also cuts an unfinished last line
        for record in ordered:
            jsonl.append(handle, record)
    if remove_shards:
        for path in shards:
            path.unlink(missing_ok=True)
    return len(ordered)

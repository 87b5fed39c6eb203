"""Run methods x ratios over the items with one loaded model; resume, shard, merge, summarise.

The results file is JSON lines, one per (item, method, ratio), appended and flushed as each
answer comes, so an interrupted run loses at most the answer in flight. A rerun skips every
(item, method, ratio) already in the file; a half-written last line is cut off and redone.
Every line carries the run's settings; resuming with other settings is refused.

Sharding: with RANK and WORLD_SIZE set (torchrun, accelerate launch), rank r takes
items[r::world] and appends to its own `<results>.rank{r}`. Rank 0 then waits for every
rank's lines (a gloo barrier when the launcher gives MASTER_ADDR/MASTER_PORT, then the files
themselves, up to a timeout) and appends what the results file lacks, in item-then-cell
order, so the merged file matches a single-process run. Shard files go once merged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from sharp_cli.errors import SharpError, UsageError, VideoError, one_line
from sharp_cli.evaluate.letters import build_prompt, parse_letter
from sharp_cli.jsonl import append as _append, open_for_append as _open_for_append  # shared with batch

POLL_SECONDS = 1.0


@dataclass
class Job:
    items: list  # every item of the run (all ranks), in order
    cells: list[tuple[str, float]]  # (method, ratio) in order
    base: object  # PruneConfig; method and ratio are replaced per cell
    results: Path
    settings: dict  # what must match for a line to be reused
    video: dict  # load_video keyword arguments: frames, fps, max_frames, max_pixels, backend
    max_new_tokens: int = 8
    rank: int = 0
    world: int = 1
    cache_gb: float = 4.0  # the per-video cache: nothing is recomputed per cell that a cell before computed

    @property
    def my_items(self) -> list:
        return self.items[self.rank:: self.world]

    @property
    def output(self) -> Path:
        return self.results if self.world == 1 else shard_path(self.results, self.rank)


def plan_cells(methods: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """`none` once at ratio 1.0, then every other method at every ratio (repeats dropped)."""
    cells = [("none", 1.0)] if "none" in methods else []
    cells += [(m, round(float(r), 6)) for m in methods if m != "none" for r in ratios]
    return list(dict.fromkeys(cells))


def key(item_id, method: str, ratio) -> tuple:
    return str(item_id), str(method), round(float(ratio), 6)


def line_key(record: dict) -> tuple:
    return key(record["item"], record["method"], record["ratio"])


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
    from sharp_cli.jsonl import complete_records

    return [r for r in complete_records(path) if {"item", "method", "ratio"} <= r.keys()]


def done_keys(job: Job) -> set:
    """Keys already answered in the results file or any shard file, after checking their settings."""
    settings = json.loads(json.dumps(job.settings))
    done = set()
    for path in [job.results, *shard_files(job.results)]:
        for record in read_results(path):
            if record.get("settings") != settings:
                difference = _first_difference(record.get("settings"), settings)
                raise UsageError(f"{path} holds results of other settings ({difference}); "
                                 "pass another --output, or remove that file to start over")
            done.add(line_key(record))
    return done


def _first_difference(old, new) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            return f"{name}: {old.get(name)!r} there, {new.get(name)!r} now"
    return "same"


def pending(job: Job) -> list[tuple[object, list[tuple[str, float]]]]:
    """(item, cells still to answer) for this rank's items that have any."""
    done = done_keys(job)
    todo = []
    for item in job.my_items:
        cells = [c for c in job.cells if key(item.id, *c) not in done]
        if cells:
            todo.append((item, cells))
    return todo


# -- answering -------------------------------------------------------------------------------------
def prompt_for(item) -> str:
    """The item's prompt (the benchmark's, set by prompts.apply), else the multiple-choice prompt, or
    the bare question for an item without options."""
    if getattr(item, "prompt", None):
        return item.prompt
    return build_prompt(item.question, item.options) if item.options else item.question


def run(loaded, job: Job, todo, progress=None) -> int:
    """Answer every pending cell: one video decode per item, answer.ask per cell. Returns lines written.

    Pruned lines carry their first-token agreement with the unpruned answer of the same item: from
    the `none` cell answered just before, or, when that one was answered by an earlier run (resumed),
    from one unpruned prefill redone here (logits are not stored in the results file)."""
    from sharp_cli import answer as answer_mod
    from sharp_cli.prune.prior import PriorStore
    from sharp_cli.video_cache import VideoCache

    store = PriorStore()
    # Every cell of an item asks about the same video: its frames, vision output and the prompt's
    # start (for each K and segment setting) are computed once per item, not once per cell.
    cache = VideoCache(int(job.cache_gb * 2**30))
    written = 0
    compare = ("none", 1.0) in job.cells
    with _open_for_append(job.output) as handle:
        for item, cells in todo:
            try:
                clip = cache.load_video(item.video, **job.video)
            except VideoError as exc:  # a broken file stays broken: record it, count it wrong, go on
                for method, ratio in cells:
                    _append(handle, _record(job, item, method, ratio, error=one_line(str(exc), 300)))
                    written += 1
                    if progress is not None:
                        progress()
                continue
            prompt = prompt_for(item)
            ask = lambda cfg, tokens: answer_mod.ask(loaded, clip, prompt, cfg, max_new_tokens=tokens,  # noqa: E731
                                                     max_pixels=job.video.get("max_pixels"), store=store,
                                                     cache=cache)
            reference = None
            if compare and ("none", 1.0) not in cells:
                reference = ask(replace(job.base, method="none", ratio=1.0), 1).prefill.logits
            for method, ratio in sorted(cells, key=lambda c: c[0] != "none"):  # the reference first
                answer = ask(replace(job.base, method=method, ratio=ratio), job.max_new_tokens)
                if method == "none":
                    reference = answer.prefill.logits
                _append(handle, _record(job, item, method, ratio, answer=answer, reference=reference))
                written += 1
                if progress is not None:
                    progress()
    return written


def _record(job: Job, item, method: str, ratio: float, answer=None, error: str | None = None,
            reference=None) -> dict:
    from sharp_cli.evaluate import agreement

    labelled = bool(item.options) and item.answer is not None
    record = {"item": item.id, "method": method, "ratio": ratio, "category": item.category, "answer": item.answer,
              "prediction": None, "correct": False if labelled else None, "output": None}
    if answer is not None:
        layout = answer.encoded.layout
        kept = answer.prefill.kept
        prediction = parse_letter(answer.text, item.options) if item.options else None
        record.update(prediction=prediction, correct=prediction == item.answer if labelled else None,
                      output=answer.text, first_token=int(answer.prefill.logits.reshape(-1).argmax()),
                      visual_tokens_total=int(layout.num_visual),
                      visual_tokens_kept=int(kept.numel()) if kept is not None else int(layout.num_visual),
                      prefill_seconds=answer.prefill.seconds, vision_seconds=answer.vision_seconds,
                      decode_seconds=answer.decode_seconds)
        if method != "none" and reference is not None:
            record.update(agreement.first_token(reference, answer.prefill.logits))
    else:
        record["error"] = error
    record.update(rank=job.rank, time=round(time.time(), 3), settings=job.settings)
    return record


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
    have = {line_key(rec) for rec in read_results(job.results)}
    shards = shard_files(job.results)
    new = {}
    for path in shards:
        for record in read_results(path):
            k = line_key(record)
            if k not in have and k not in new:
                new[k] = record
    position = {key(item.id, *c): (i, j) for i, item in enumerate(job.items) for j, c in enumerate(job.cells)}
    ordered = sorted(new.values(), key=lambda rec: position.get(line_key(rec), (len(job.items), 0)))
    with _open_for_append(job.results) as handle:  # also cuts an unfinished last line
        for record in ordered:
            _append(handle, record)
    if remove_shards:
        for path in shards:
            path.unlink(missing_ok=True)
    return len(ordered)


# -- summary ---------------------------------------------------------------------------------------
def summarize(records: list[dict], items: list, cells: list[tuple[str, float]]) -> list[dict]:
    """Per (method, ratio): accuracy (over the items with an answer), accuracy relative to `none`,
    per category, agreement with `none` (over every item), mean prefill and kept tokens."""
    from sharp_cli.evaluate import agreement

    by_key = {}
    for record in records:
        by_key.setdefault(line_key(record), record)
    references = {str(item.id): by_key[k] for item in items if (k := key(item.id, "none", 1.0)) in by_key}
    options_of = {str(item.id): item.options for item in items}
    rows = []
    for method, ratio in cells:
        found = [by_key[k] for item in items if (k := key(item.id, method, ratio)) in by_key]
        answered = [r for r in found if not r.get("error")]
        labelled = [r for r in found if r.get("correct") is not None]
        categories: dict[str, list[bool]] = {}
        for record in labelled:
            if record.get("category") is not None:
                categories.setdefault(str(record["category"]), []).append(bool(record.get("correct")))
        row = {
            "method": method, "ratio": ratio, "questions": len(found), "of": len(items),
            "correct": sum(bool(r.get("correct")) for r in labelled),
            "accuracy": _mean([bool(r.get("correct")) for r in labelled]),
            "relative_accuracy": None,
            "categories": {c: _mean(v) for c, v in categories.items()},
            "unparsed": sum(r.get("prediction") is None for r in answered if options_of.get(str(r["item"]))),
            "errors": len(found) - len(answered),
            "prefill_seconds": _mean([r["prefill_seconds"] for r in answered if "prefill_seconds" in r]),
            "visual_tokens_kept": _mean([r["visual_tokens_kept"] for r in answered if "visual_tokens_kept" in r]),
            "visual_tokens_total": _mean([r["visual_tokens_total"] for r in answered if "visual_tokens_total" in r]),
        }
        if method == "none":  # the reference itself
            row.update(agreement_questions=0, answer_agreement=None, first_token_agreement=None, first_token_kl=None)
        else:
            row.update(agreement.summarize(found, references, options_of))
        rows.append(row)
    base = next((r for r in rows if r["method"] == "none"), None)
    for row in rows:
        if base is not None and base["accuracy"] and row["accuracy"] is not None:
            row["relative_accuracy"] = row["accuracy"] / base["accuracy"]
    return rows


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None

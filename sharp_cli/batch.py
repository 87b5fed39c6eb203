"""`sharp batch FILE`: many questions, one loaded model, JSON lines in and out.

Each input line is {"video", "question", "id"?, "options"?, settings?}: "options" are multiple-choice
answers, asked as `sharp eval` asks them (batch_items.prompt_of); the settings are the fields a `sharp
serve` request may add: method, ratio, layer, frames, fps, max_pixels, max_tokens, temperature, top_p,
top_k, seed. The other fields of a `sharp eval` / `sharp synth` item are ignored (evaluate/items.py's
ITEM_FIELDS). Each answer is one output line as soon as it is ready: the `sharp ask --json` object
plus "id" (the line number when the item has none) and, with options, "prediction". A bad item (not
JSON, an unknown field, a missing video, a bad option) is an {"id", "error"} line and the run goes
on; the exit code is 1 if any item failed.

With --output the lines are appended to that file, and a rerun skips the ids it already answered
(failed ones are tried again); an unfinished last line from an interrupted run is cut off and redone.

With --max-batch N > 1 up to N items are decoded together (batch_together.py); lines keep the input
order. What one item goes through (its frames, answer, output line) is in batch_items.py, shared by both.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from sharp_cli.batch_items import Progress, answer_item, outcome
from sharp_cli.options import (
    DEFAULT_MODEL,
    CacheGb,
    Compile,
    CudaGraphs,
    Decoder,
    Device,
    Dtype,
    Fps,
    Frames,
    KvGb,
    MaxBatch,
    MaxFrames,
    MaxPixels,
    Model,
    NoPriorCache,
    Quant,
    RandomWeights,
    TrustRemoteCode,
    prune_options,
)
from sharp_cli.prune.config import PruneConfig

InputFile = Annotated[str, typer.Argument(
    help="JSON lines of {video, question, id?, options?, settings?} (see above); '-' reads stdin.")]
Output = Annotated[Optional[str], typer.Option(
    "--output", "-o", help="Append the lines to this file instead of stdout; a rerun skips the ids answered there.")]
VideoDir = Annotated[Optional[str], typer.Option(
    help="Folder relative video paths are in (default: the input file's folder; the current one for stdin).")]
MaxNewTokens = Annotated[int, typer.Option(help="Answer tokens when an item gives no max_tokens.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress on stderr.")]


@prune_options()
def batch_command(
    file: InputFile,
    model: Model = DEFAULT_MODEL,
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    random_weights: RandomWeights = False, trust_remote_code: TrustRemoteCode = False,
    frames: Frames = 32, fps: Fps = None, max_frames: MaxFrames = 768, max_pixels: MaxPixels = None,
    decoder: Decoder = "auto",
    prune: PruneConfig = PruneConfig(),
    max_new_tokens: MaxNewTokens = 128, output: Output = None, video_dir: VideoDir = None,
    no_prior_cache: NoPriorCache = False, cuda_graphs: CudaGraphs = True, compile_model: Compile = False,
    cache_gb: CacheGb = 4.0,
    max_batch: MaxBatch = None, kv_gb: KvGb = None, quiet: Quiet = False,
):
    """Answer a JSON-lines file of questions, one JSON line per answer (resumable with --output).

    Each line is {"video": ..., "question": ...} with, optionally, "id", "options" (2 to 26 answer
    texts: the question is asked as `sharp eval` asks it, "A. ..." lines and an instruction to answer
    with the letter; the line then adds "prediction", the letter read from the answer) and settings
    of that question: method, ratio, layer, frames, fps, max_pixels, max_tokens, temperature, top_p,
    top_k, seed. The other fields of a `sharp eval` or `sharp synth` item (answer, category,
    needle_boxes, needle_frames, needle_part, camera, scene_starts) are ignored; any other field is
    that item's error, as is a bad value (true, false or a string where a number belongs, too).
    """
    from sharp_cli.errors import UsageError
    from sharp_cli.options import check_kv_gb, check_output_file, max_batch_for, quiet_transformers
    from sharp_cli.overrides import MAX_TOKENS_LIMIT, Defaults

    cfg = prune.validate()
    if not 1 <= max_new_tokens <= MAX_TOKENS_LIMIT:
        raise UsageError(f"--max-new-tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_new_tokens}")
    if frames < 1 or (fps is not None and not fps > 0) or max_frames < 1 or (max_pixels is not None and max_pixels < 1):
        raise UsageError("--frames, --max-frames and --max-pixels must be >= 1, --fps > 0")
    if file != "-" and not os.path.isfile(file):
        raise UsageError(f"no such file: {file}" if not os.path.exists(file) else f"not a file: {file}")
    check_output_file(output, "--output")
    if output is not None and file != "-" and os.path.exists(output) and os.path.samefile(output, file):
        raise UsageError("--output is the input file; the answers would be appended to the questions")
    if output is not None:  # only a results file of ours is appended to, before the model loads
        from sharp_cli import jsonl

        jsonl.check_ours(Path(output), jsonl.is_batch_record)
    if not cache_gb >= 0:
        raise UsageError(f"--cache-gb must be >= 0, got {cache_gb}")
    if video_dir is not None and not os.path.isdir(video_dir):
        raise UsageError(f"--video-dir is not a folder: {video_dir}")
    check_kv_gb(kv_gb)
    if max_batch is not None:
        max_batch_for(max_batch, device)
    base = Path(video_dir or (os.path.dirname(os.path.abspath(file)) if file != "-" else os.getcwd()))

    from sharp_cli import model_files

    cfg = model_files.check_layer(model, cfg, random_weights)  # K resolved and checked, before torch loads
    quiet_transformers()
    from sharp_cli import loading

    cfg = loading.check_prune_config(model, cfg, random_weights=random_weights, trust_remote_code=trust_remote_code)
    progress = Progress(quiet, total=None if file == "-" else _count_lines(file))
    progress.say(f"loading {model}")
    loaded = loading.load(model, device=device, quant=quant, dtype=dtype, random_weights=random_weights,
                          trust_remote_code=trust_remote_code)
    loaded.use_cuda_graphs(cuda_graphs)
    loaded.use_compile(compile_model)
    video = dict(frames=frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels, backend=decoder)
    defaults = Defaults(cfg, video, max_new_tokens)  # K resolved above, once
    # Bytes, decoded line by line: one line of invalid UTF-8 is that item's error, not the run's end.
    source = getattr(sys.stdin, "buffer", sys.stdin) if file == "-" else open(file, "rb")
    try:
        failed = run(loaded, source, defaults, base, output, progress, prior_cache=not no_prior_cache,
                     cache_gb=cache_gb, max_batch=max_batch_for(max_batch, loaded.device.type), kv_gb=kv_gb)
    finally:
        if file != "-":
            source.close()
    raise typer.Exit(1 if failed else 0)


def run(loaded, source, defaults, base: Path, output: str | None, progress: Progress, prior_cache: bool = True,
        cache_gb: float = 4.0, max_batch: int = 1, kv_gb: float | None = None) -> int:
    """Answer every item of `source` (lines, as bytes or text); returns how many failed. max_batch
    > 1: answered together (batch_together.py), the lines still written in input order."""
    from sharp_cli import jsonl
    from sharp_cli.prune.prior import PriorStore
    from sharp_cli.video_cache import VideoCache

    cache = VideoCache(int(cache_gb * 2**30)) if cache_gb > 0 else None

    done = answered_ids(Path(output)) if output else set()
    store = PriorStore(use_disk=prior_cache)
    sink = jsonl.open_for_append(Path(output), jsonl.is_batch_record) if output else sys.stdout
    try:
        if max_batch > 1:
            from sharp_cli import batch_together

            batch_together.run(loaded, entries(source, done, progress), defaults, base, sink, progress, store, cache,
                               max_batch, kv_gb)
        else:
            for item_id, item, error in entries(source, done, progress):
                started, record = time.perf_counter(), None
                if error is None:
                    record, error = answer_item(loaded, item, defaults, base, store, progress, cache)
                jsonl.append(sink, outcome(progress, item_id, record, error, time.perf_counter() - started))
    finally:
        if sink is not sys.stdout:
            sink.close()
    progress.summary(output)
    return progress.failed


def entries(source, done: set, progress: Progress):
    """(id, BatchItem or None, error or None) of each non-blank line, in order; a line whose id
    was answered before (in `done`) is counted as skipped instead."""
    seen: dict[str, int] = {}
    for number, raw in enumerate(source, 1):
        if not raw.strip():
            continue
        item_id, item, error = parse_item(raw, number)
        key = str(item_id)
        if error is None and key in seen:
            error = f"duplicate id {item_id!r} (line {seen[key]} has it too)"
        seen.setdefault(key, number)
        if error is None and key in done:
            progress.skipped += 1
            progress.item(item_id, "answered before, skipped")
            continue
        yield item_id, item, error


def parse_item(raw: str, number: int):
    """(id, BatchItem or None, error or None) of one input line (bytes or text)."""
    import json

    from pydantic import ValidationError

    from sharp_cli.evaluate.items import ITEM_FIELDS
    from sharp_cli.overrides import BatchItem, validation_message

    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return number, None, f"line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at {exc.start + 1})"
    try:
        data = json.loads(raw)
    except RecursionError:
        return number, None, f"line {number} is not JSON this program reads (nested too deeply)"
    except ValueError as exc:
        return number, None, f"line {number} is not JSON ({exc.msg})"
    if not isinstance(data, dict):
        return number, None, f"line {number} is not a JSON object"
    given = data.get("id")
    item_id = given if isinstance(given, (str, int)) and not isinstance(given, bool) else number
    # A `sharp eval` / `sharp synth` item (answer, category, needle_*, ...) is a batch item too.
    data = {key: value for key, value in data.items() if key in BatchItem.model_fields or key not in ITEM_FIELDS}
    try:
        return item_id, BatchItem.model_validate(data), None
    except ValidationError as exc:
        return item_id, None, validation_message(exc)


def answered_ids(path: Path) -> set[str]:
    """Ids with an answer (not an error) in a results file: a rerun skips them."""
    from sharp_cli import jsonl

    return {str(r["id"]) for r in jsonl.complete_records(path) if "id" in r and "error" not in r}


def _count_lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


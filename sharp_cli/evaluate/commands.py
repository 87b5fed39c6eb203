"""`sharp eval` and `sharp synth`: plain functions with Typer-annotated parameters.

sharp_cli/cli.py registers them; the option types come from sharp_cli/options.py. Nothing heavy
is imported at the top: `sharp --help` must not import torch.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sharp_cli.options import (
    DEFAULT_MODEL,
    CacheGb,
    Compile,
    Decoder,
    Device,
    Dtype,
    Fps,
    Frames,
    JsonOut,
    KvGb,
    MaxBatch,
    MaxFrames,
    MaxPixels,
    Model,
    Quant,
    RandomWeights,
    TrustRemoteCode,
    prune_options,
)
from sharp_cli.prune.config import PruneConfig

TASKS = ("colour", "direction", "order", "count", "flash", "sequence", "objects", "dominant", "motion", "scenes")
TASK_GROUPS = ("basic", "hard", "all")  # synth.TASKS and synth.GROUPS, without importing numpy for --help
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No table or progress on stderr.")]
Format = Annotated[str, typer.Option(help="auto, sharp, videomme, mvbench, mlvu or longvideobench "
                                      "(auto: from the folder layout or the annotation fields; docs/eval.md).")]
VideoDir = Annotated[Optional[str], typer.Option(
    help="Where the videos are, if not where the download puts them: the folder of the video files "
         "(MVBench: the folder holding its task folders).")]
Prompt = Annotated[str, typer.Option(
    help="auto (the benchmark's reference prompt, lmms-eval's), sharp, videomme, mvbench, mlvu or longvideobench.")]
CategoryField = Annotated[Optional[str], typer.Option(
    help="Annotation field to break accuracy down by (default: the format's, see docs/eval.md).")]
SkipMissing = Annotated[bool, typer.Option("--skip-missing", help="Leave out questions whose video is missing.")]
Methods = Annotated[str, typer.Option(help="Comma list of methods to compare: sharp, fastv, evs, random, none.")]
Ratios = Annotated[Optional[list[str]], typer.Option(help="Ratio(s) kept; repeat or give a comma list.")]
MaxNewTokens = Annotated[int, typer.Option(help="Upper bound on answer tokens (a letter needs few).")]
Limit = Annotated[Optional[int], typer.Option(help="Only the first N questions.")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="Results file, JSON lines; a rerun resumes it. "
                                               "Default: sharp-eval-<data>-<model>.jsonl in the current folder.")]
ShardTimeout = Annotated[float, typer.Option(help="Sharded runs: seconds rank 0 waits for the other ranks.")]
TieSeeds = Annotated[int, typer.Option(help="Seeds per score-based cell (sharp, fastv, ...): each breaks exact score "
                                       "ties its own way; later seeds are skipped where the first tied nothing.")]
RandomSeeds = Annotated[Optional[int], typer.Option(help="Seeds of the random baseline (default: --tie-seeds, at "
                                                    "least 5).", show_default=False)]
Bootstrap = Annotated[int, typer.Option(help="Resamples of the paired bootstrap intervals (0: no intervals).")]
FirstSeed = Annotated[int, typer.Option("--seed", help="First seed of every cell: seeds S, S+1, ... (none: one run).")]


@prune_options(skip=("method", "ratio", "seed"))  # seeds: --seed and --tie-seeds below
def eval_command(
    data: Annotated[str, typer.Argument(help="Questions: a file, or a benchmark's folder (see --format).")],
    format: Format = "auto", video_dir: VideoDir = None, category_field: CategoryField = None,
    skip_missing: SkipMissing = False, prompt: Prompt = "auto",
    model: Model = DEFAULT_MODEL,
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    random_weights: RandomWeights = False, trust_remote_code: TrustRemoteCode = False,
    methods: Methods = "none,fastv,random,sharp", ratio: Ratios = None,
    prune: PruneConfig = PruneConfig(),
    seed: FirstSeed = 0,
    frames: Frames = 32, fps: Fps = None, max_frames: MaxFrames = 768, max_pixels: MaxPixels = None,
    decoder: Decoder = "auto", max_new_tokens: MaxNewTokens = 8, limit: Limit = None, output: Output = None,
    shard_timeout: ShardTimeout = 3600.0, cache_gb: CacheGb = 4.0, compile_model: Compile = False,
    max_batch: MaxBatch = None, kv_gb: KvGb = None, json_out: JsonOut = False, quiet: Quiet = False,
    tie_seeds: TieSeeds = 3, random_seeds: RandomSeeds = None, bootstrap: Bootstrap = 2000,
):
    """Multiple-choice accuracy of every method and ratio on a video QA set (resumable, shardable)."""
    from dataclasses import replace

    from sharp_cli.errors import SharpError, UsageError
    from sharp_cli.evaluate import formats, headline, prompts
    from sharp_cli.options import check_kv_gb, max_batch_for, quiet_transformers, split_list, stderr_console
    from sharp_cli.prune.config import METHODS

    method_list = split_list([methods], str, "--methods")
    for m in method_list:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method '{m}'; choose from {', '.join(METHODS)}")
    if not method_list:
        raise UsageError("--methods is empty")
    ratios = split_list(ratio or ["0.15"], float, "--ratio")
    for r in ratios:  # validates every ratio; the base config's method and ratio are set per cell
        replace(prune, ratio=r).validate()
    base = replace(prune, ratio=1.0).validate()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if not cache_gb >= 0:
        raise UsageError(f"--cache-gb must be >= 0, got {cache_gb}")
    check_kv_gb(kv_gb)
    if max_batch is not None:
        max_batch_for(max_batch, device)
    if max_new_tokens < 1 or shard_timeout <= 0:
        raise UsageError("--max-new-tokens must be >= 1 and --shard-timeout > 0")
    random_seeds = max(5, tie_seeds) if random_seeds is None else random_seeds
    if tie_seeds < 1 or random_seeds < 1 or bootstrap < 0 or seed < 0:
        raise UsageError("--tie-seeds and --random-seeds must be >= 1, --bootstrap and --seed >= 0")
    prompts.check(prompt)
    console = stderr_console(quiet)
    dataset = formats.drop_missing(formats.load(data, format, video_dir, category_field), skip_missing)
    dataset, prompt = prompts.apply(dataset, prompt)
    items = dataset.items[:limit] if limit else dataset.items
    for note in dataset.notes:
        console.print(f"note: {note}")

    quiet_transformers()
    from sharp_cli import loading
    from sharp_cli.evaluate import runner

    rank, world = runner.distributed()
    # K resolved for the model first: it is part of the settings a resumed run must match.
    if "evs" in method_list:  # refused on some families (Qwen3-VL): before any answer, not in a cell
        loading.check_prune_config(model, replace(base, method="evs"), random_weights=random_weights,
                                   trust_remote_code=trust_remote_code)
    base = loading.check_prune_config(model, base, random_weights=random_weights, trust_remote_code=trust_remote_code)
    dev = loading.resolve_device(device)
    settings = {  # a results line is reused only under the same settings
        "model": model, "random_weights": random_weights, "quant": loading.resolve_quant(quant, dev, model),
        "dtype": str(loading.resolve_dtype(dtype, dev)).replace("torch.", ""), "frames": frames, "fps": fps,
        "max_frames": max_frames, "max_pixels": max_pixels, "max_new_tokens": max_new_tokens,
        "prompt": prompts.setting(prompt),
        "options": {k: v for k, v in base.as_dict().items() if k not in ("method", "ratio", "seed")},
    }
    video = dict(frames=frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels, backend=decoder)
    cells = runner.plan_cells(method_list, ratios, tie_seeds, random_seeds, seed)
    job = runner.Job(items, cells, base, default_output(output, dataset.name, model), settings, video,
                     max_new_tokens, rank, world, cache_gb, max_batch=max_batch, kv_gb=kv_gb)
    first, later = runner.pending(job), runner.pending(job, later=True)
    left = _count(first) + _count(later)  # later seeds: at most this many (skipped where nothing tied)
    done = runner.done_records(job)
    there = sum(runner.key(item.id, *c) in done for item in job.my_items for c in job.cells)
    if there:
        console.print(f"resuming {job.output}: {there} of {len(job.my_items) * len(job.cells)} answers already there")
    group = runner.Group(world, shard_timeout)
    try:
        if first or later:
            _answer(job, first, left, console, dict(name=model, device=device, quant=quant, dtype=dtype,
                                                    random_weights=random_weights, trust_remote_code=trust_remote_code),
                    compile_model)
        group.barrier()
    finally:
        group.close()
    if rank != 0:
        console.print(f"rank {rank}: done ({len(job.my_items)} questions in {job.output}); rank 0 merges")
        return
    missing = runner.wait_for_shards(job, shard_timeout) if world > 1 else []
    runner.merge(job, remove_shards=not missing)
    if missing:
        raise SharpError(f"ranks {', '.join(map(str, missing))} did not finish within {shard_timeout:g} s; "
                         f"merged what was there into {job.results}; run again to resume")
    from sharp_cli.evaluate import stats, summary

    records = runner.read_results(job.results)
    rows = summary.summarize(records, items, job.cells, bootstrap)
    headline.add(rows, records, items, dataset.format)  # MLVU's M-Avg etc. beside the accuracy
    warning = summary.tie_warning(rows)
    result = {"rows": rows, "questions": len(items), "data": str(data), "format": dataset.format,
              "results_file": str(job.results), "world_size": world, "settings": settings,
              "seeds": {"first": seed, "tie": tie_seeds, "random": random_seeds},
              "bootstrap": {"resamples": bootstrap, "seed": stats.DEFAULT_SEED, "level": stats.LEVEL},
              "warnings": [warning] if warning else []}
    if json_out:
        from sharp_cli import report

        report.print_json(result)
    if not quiet:
        from sharp_cli.evaluate.table import table

        if warning:
            console.print(warning, markup=False, soft_wrap=True)  # one line, whatever the width
        console.print(table(result, width=console.width))


def _count(todo) -> int:
    return sum(len(cells) for _, cells in todo)


def _answer(job, first, left: int, console, load_args: dict, compile_model: bool = False) -> None:
    """Load the model once (on this rank's GPU when sharded) and answer with a progress bar: the
    first seeds, then the later seeds that the first ones' tie audit leaves to run."""
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sharp_cli import loading
    from sharp_cli.evaluate import runner
    from sharp_cli.prune.prior import PriorStore
    from sharp_cli.video_cache import VideoCache

    if job.world > 1 and loading.resolve_device(load_args["device"]).type == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", job.rank)) % torch.cuda.device_count())
    with console.status(f"loading {load_args['name']}"):
        loaded = loading.load(**load_args)
    loaded.use_compile(compile_model)  # not in the settings: compiled answers are the same answers
    from sharp_cli.options import max_batch_for

    job.max_batch = max_batch_for(job.max_batch, loaded.device.type)  # None: the device's default
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    shared = dict(cache=VideoCache(int(job.cache_gb * 2**30)), store=PriorStore())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("answering" if job.world == 1 else f"rank {job.rank}", total=left)
        advance = lambda: progress.advance(task)  # noqa: E731
        written = runner.run(loaded, job, first, progress=advance, **shared)
        later = runner.pending(job, later=True)
        progress.update(task, total=written + _count(later))
        runner.run(loaded, job, later, progress=advance, **shared)


def default_output(output, data_name: str, model: str):
    import os
    import re
    from pathlib import Path

    if output:
        from sharp_cli import jsonl
        from sharp_cli.options import check_output_file

        check_output_file(output, "--output")
        jsonl.check_ours(Path(output), jsonl.is_eval_record)  # before the model loads; nothing else is appended to
        return Path(output).absolute()
    slug = Path(model.rstrip("/")).name if os.path.isdir(model) else model.replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"sharp-eval-{data_name}-{slug}")
    return Path.cwd() / f"{name}.jsonl"


def synth_command(
    out: Annotated[str, typer.Argument(help="Folder to write videos/ and items.jsonl into.")],
    n: Annotated[int, typer.Option("--n", help="Number of questions (and clips).")] = 40,
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 32,
    size: Annotated[int, typer.Option(help="Frame width and height in pixels.")] = 128,
    tasks: Annotated[str, typer.Option(
        help="Comma list of tasks or groups: basic (colour, direction, order, count: still camera), hard "
             "(flash, sequence, objects, dominant, motion, scenes: moving camera, textures, cuts; "
             "--frames >= 32), all.")] = "basic",
    quiet: Quiet = False,
):
    """Write a synthetic multiple-choice set whose answers hang on a few visual tokens."""
    from rich.progress import Progress

    from sharp_cli.evaluate import synth
    from sharp_cli.options import split_list, stderr_console

    console = stderr_console(quiet)
    names = synth.prepare(out, n, seed, frames=frames, size=size, tasks=tuple(split_list([tasks], str, "--tasks")))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing clips", total=n)
        items = synth.write(out, n, seed, frames=frames, size=size, tasks=names,
                            progress=lambda: progress.advance(task))
    typer.echo(str(items))
    console.print(f"{n} question{'' if n == 1 else 's'} in {items}; evaluate with: "
                  f"sharp eval {items} -m sharp-tiny --frames {frames} "
                  "(sharp-tiny: the small model shipped with sharp, offline on a CPU)")

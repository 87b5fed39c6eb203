"""Option types and helpers shared by every command (ask, bench, eval, batch, serve).

Plain Typer annotations, so each command module declares its parameters with them and none of
the command modules imports another; the pruning options come from PruneConfig's fields through
@prune_options. Nothing heavy is imported here: `sharp --help` stays instant.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Optional

import typer

from sharp_cli import DEFAULT_MODEL  # noqa: F401  (the commands' default; light: no torch)
from sharp_cli.errors import UsageError

Model = Annotated[str, typer.Option("-m", "--model", envvar="SHARP_MODEL",
                                    help="Hub id or local folder of a supported video LLM.")]
Device = Annotated[str, typer.Option(metavar="[auto|cuda|cpu]", help="auto, cuda or cpu.")]
Quant = Annotated[str, typer.Option(metavar="[auto|nf4|int8|none]",
                                    help="auto (nf4 on CUDA, none on CPU and for sharp-tiny), nf4, int8 or none.")]
Dtype = Annotated[str, typer.Option(metavar="[auto|bfloat16|float16|float32]",
                                    help="auto (bfloat16 on GPUs that have it, else float16; float32 on CPU), "
                                         "bfloat16, float16, float32.")]
RandomWeights = Annotated[bool, typer.Option("--random-weights", help="Build the model's architecture from its "
                                             "shipped config with random weights (speed measurements, no download).")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code",
                                               help="Allow model code from the hub (off by default).")]
Frames = Annotated[int, typer.Option(help="Frames sampled uniformly over the video.")]
Fps = Annotated[Optional[float], typer.Option(
    help="Sample this many frames per second instead (capped by --max-frames).")]
MaxFrames = Annotated[int, typer.Option(help="Upper bound on frames sampled, with --fps or --frames (a note says "
                                                "when it cut --frames).")]
MaxPixels = Annotated[Optional[int], typer.Option(
    help="Upper bound on pixels per frame (so on visual tokens per frame), replacing the model family's "
         "reference budget (docs/video.md).", show_default=False)]
MaxVisualTokens = Annotated[Optional[int], typer.Option(
    help="Refuse a clip that would become more visual tokens than this (checked before decoding and "
         "before the vision encoder).", show_default=False)]
Decoder = Annotated[str, typer.Option(metavar="[auto|decord|pyav]",
                                      help="Video decoder: auto (PyAV, then decord if PyAV fails), decord or pyav.")]
Temperature = Annotated[float, typer.Option(help="Sample with this temperature (0: greedy, the default, as "
                                            "generate(do_sample=False)).")]
TopP = Annotated[float, typer.Option(help="Sampling: keep the smallest set of tokens whose probability reaches this.")]
TopK = Annotated[int, typer.Option(help="Sampling: keep only the k most likely tokens (0: no limit).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CacheGb = Annotated[float, typer.Option(help="Memory (GiB) for what a second question about the same video reuses: "
                                        "its frames, the vision encoder's output and the prompt's start (0: off).")]
NoPriorCache = Annotated[bool, typer.Option("--no-prior-cache",
                                            help="Do not read or write the on-disk positional-prior cache.")]
CudaGraphs = Annotated[bool, typer.Option(help="Replay decode steps and the pruned prefill layers from CUDA graphs.")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the decode step and the vision blocks (fuses their small kernels); the "
                      "first answer of a process compiles, minutes on a 7B model: for many answers per "
                      "process (serve, batch, eval).")]

MaxBatch = Annotated[Optional[int], typer.Option(
    help="Answers decoded together, each joining and leaving the batch on its own (continuous batching); "
         "1: one at a time. Default: 16 on CUDA, 1 on CPU.", show_default=False)]
KvGb = Annotated[Optional[float], typer.Option(
    help="KV cache memory (GiB) for the answers decoded together: with --max-batch, it bounds how many are in "
         "flight (pruned ones take less). Default: 60% of the GPU memory free after loading.", show_default=False)]


def max_batch_for(max_batch: int | None, device: str) -> int:
    """--max-batch as given, or its default for the device the model will load on (16 on CUDA:
    a decode step reads the weights once for every sequence it carries; 1 on CPU)."""
    if max_batch is None:
        import torch

        return 16 if device in ("auto", "cuda") and torch.cuda.is_available() else 1
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}")
    return max_batch


def check_kv_gb(kv_gb: float | None) -> None:
    if kv_gb is not None and not kv_gb > 0:
        raise UsageError(f"--kv-gb must be > 0, got {kv_gb}")


def prune_options(*, skip: tuple[str, ...] = ()):
    """Decorator for a command with a `prune` parameter: in its place, one option per PruneConfig
    field (name, type, default and help from the field; booleans as --x/--no-x), and the command
    is called with prune=PruneConfig(...) of their values, not validated yet (a command validates
    it as it needs: per ratio, against a model). `skip`: fields the command takes its own way
    (eval and bench take lists of methods and ratios); those keep PruneConfig's defaults."""
    import functools
    import inspect
    from dataclasses import fields
    from typing import get_type_hints

    from sharp_cli.prune.config import PruneConfig

    types = get_type_hints(PruneConfig)
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(f.name, keyword, default=f.default, annotation=Annotated[
        types[f.name], typer.Option(help=f.metadata["help"], show_default=f.default is not None)])
        for f in fields(PruneConfig) if f.name not in skip]
    names = [p.name for p in added]

    def wrap(command):
        own = inspect.signature(command, eval_str=True)
        if "prune" not in own.parameters:
            raise TypeError(f"{command.__name__} has no `prune` parameter")
        params = []
        for p in own.parameters.values():  # the options take the place of `prune`, so --help keeps an order
            if p.name == "prune":
                params.extend(added)
            else:
                params.append(p.replace(kind=keyword))

        @functools.wraps(command)
        def run(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, prune=PruneConfig(**values))

        run.__signature__ = own.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def sampling(temperature: float, top_p: float, top_k: int, seed: int):
    from sharp_cli.sampling import Sampling

    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed).validate()


def stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def quiet_transformers():
    """transformers' progress bars and advisory warnings would drown the one-line contract."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def split_list(values: list[str] | None, cast, name: str) -> list:
    out = []
    for value in values or []:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise UsageError(f"{name}: cannot read '{part.strip()}'") from None
    return out


def check_output_file(path, flag: str) -> None:
    """Before any work (a model load, a bench): UsageError unless `path` can be written as a file, so a
    typo in an output path costs a line, not the run it would have held."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} '{path}' is a folder, not a file")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} '{path}': the folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{path}': cannot write in '{folder}'")


@contextmanager
def atomic_path(path):
    """A temporary name beside `path` to write to: renamed to `path` when the block ends, removed when
    it fails (a full disk, Ctrl-C), so an interrupted run never leaves half a file under either name."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, text: str) -> None:
    """Write `text` to `path` whole or not at all (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)

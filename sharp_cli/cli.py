"""The `sharp` command line: thin commands over answer, bench and eval.

Answers go to stdout, tables and progress to stderr. Errors are one line on stderr with exit code
1 (runtime) or 2 (usage); 130 on Ctrl-C. SHARP_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from sharp_cli.errors import SharpError, UsageError, debug_enabled, one_line
from sharp_cli.errors import describe as _describe  # shared with serve and batch
from sharp_cli.options import (
    DEFAULT_MODEL,
    Compile,
    CudaGraphs,
    Decoder,
    Device,
    Dtype,
    Fps,
    Frames,
    JsonOut,
    MaxFrames,
    MaxPixels,
    MaxVisualTokens,
    Model,
    NoPriorCache,
    Quant,
    RandomWeights,
    Temperature,
    TopK,
    TopP,
    TrustRemoteCode,
    check_output_file,
    prune_options,
    quiet_transformers,
    sampling,
    split_list,
    stderr_console,
    write_atomic,
)
from sharp_cli.prune.config import PruneConfig


class SharpGroup(TyperGroup):
    """Turns every failure into one line and an exit code, for users and the CLI test runner alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not (sys.argv[1:] if args is None else list(args)):  # bare `sharp`: the help, not an error
            ctx = self.make_context(prog_name or "sharp", [], resilient_parsing=True)
            sys.stdout.write(ctx.get_help() + "\n")
            sys.exit(0)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except SharpError as exc:
            _debug_reraise()
            _fail(str(exc), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - last line of defence: never a traceback
            # Typer vendors click in recent releases: recognise its exceptions by shape, not class.
            if type(exc).__name__ == "Abort":
                _fail("interrupted", 130)
            if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None and exc.exit_code == 2 else ""
                _fail(exc.format_message() + hint, exc.exit_code)
            _debug_reraise()
            _fail(_describe(exc), 1)
        if code == 130:  # recent Typer turns Ctrl-C into a bare exit code
            _fail("interrupted", 130)
        sys.exit(code if isinstance(code, int) else 0)


def _debug_reraise():
    if debug_enabled():
        raise


def _fail(message: str, code: int):
    sys.stderr.write(f"sharp: error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


app = typer.Typer(
    cls=SharpGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None, help="Ask questions about videos with a video LLM, made fast by ShaRP token pruning.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool):
    if value:
        from sharp_cli import __version__

        typer.echo(f"sharp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print sharp's version and exit.")] = False):
    """Ask questions about videos with a video LLM, made fast by ShaRP token pruning."""


Server = Annotated[Optional[str], typer.Option(
    envvar="SHARP_SERVER", show_default=False,
    help="Ask a running `sharp serve` at this URL (e.g. http://127.0.0.1:8000) instead of loading the model "
         "here: the options you give go with the question, the server's own settings cover the rest.")]


@app.command(short_help="Answer a question about a video.")
@prune_options()
def ask(
    ctx: typer.Context,
    video: Annotated[str, typer.Argument(help="Video file (mp4, mkv, webm, ...).")],
    question: Annotated[str, typer.Argument(help="The question about the video.")],
    model: Model = DEFAULT_MODEL,
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    frames: Frames = 32, fps: Fps = None, max_frames: MaxFrames = 768, max_pixels: MaxPixels = None,
    max_visual_tokens: MaxVisualTokens = None, decoder: Decoder = "auto",
    prune: PruneConfig = PruneConfig(),
    max_new_tokens: Annotated[int, typer.Option(help="Upper bound on answer tokens (stops at EOS).")] = 128,
    temperature: Temperature = 0.0, top_p: TopP = 1.0, top_k: TopK = 0,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print the answer only.")] = False,
    random_weights: RandomWeights = False, trust_remote_code: TrustRemoteCode = False,
    no_prior_cache: NoPriorCache = False,
    warmup: Annotated[int, typer.Option(
        help="Untimed passes before the timed one (first CUDA runs load kernels).")] = 0,
    cuda_graphs: CudaGraphs = True,
    compile_model: Compile = False, server: Server = None,
):
    """Answer QUESTION about VIDEO; the answer goes to stdout (as it is written, on a terminal), what it
    cost to stderr."""
    if server is not None:
        from sharp_cli.serve import client

        return client.run(ctx, server, video, question, json_out, quiet, dict(
            method=prune.method, ratio=prune.ratio, layer=prune.layer, frames=frames, fps=fps, max_pixels=max_pixels,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=prune.seed))
    cfg = prune.validate()
    pick = sampling(temperature, top_p, top_k, cfg.seed)
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if max_visual_tokens is not None and max_visual_tokens < 1:
        raise UsageError(f"--max-visual-tokens must be >= 1, got {max_visual_tokens}")
    if not question.strip():
        raise UsageError("the question is empty")
    from sharp_cli import video as video_mod

    video_mod.check_sampling(frames, fps, max_frames, max_pixels, decoder)
    info = video_mod.probe(video)  # a missing or broken video is one line, before any model lookup
    from sharp_cli import model_files

    # An unreachable hub: one line, before torch loads (the test models in the package never ask it).
    if not random_weights and model not in model_files.SHIPPED:
        from sharp_cli import hub

        hub.check_reachable(model)
    cfg = model_files.check_layer(model, cfg, random_weights)  # K resolved and checked, before torch loads
    console = stderr_console(quiet)
    quiet_transformers()
    from sharp_cli import answer as answer_mod
    from sharp_cli import loading, report
    from sharp_cli.clip_budget import ClipBudget
    from sharp_cli.models import adapter_for
    from sharp_cli.prune.prior import PriorStore

    config = loading.model_config(model, random_weights=random_weights, trust_remote_code=trust_remote_code)
    cfg = loading.check_prune_config(model, cfg, config=config)
    fit = ClipBudget(adapter_for(config), config, loading.saved_video_bound(model, random_weights=random_weights))
    limits = dict(question=question, max_new_tokens=max_new_tokens, max_visual_tokens=max_visual_tokens)
    video_args = dict(frames=frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels, backend=decoder)
    video_args = fit.plan(info, video_args, **limits)  # refused before decoding; decoded no larger than kept
    # The frames are decoded while the model loads (seconds for a long video or an HD one, paid
    # otherwise on top of the load); torch is imported already, as decord needs (docs/video.md).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="sharp-decode") as pool:
        decoding = pool.submit(_timed, video_mod.load_video, video, **video_args)
        loaded, load_s = _load(console, model, device, quant, dtype, random_weights, trust_remote_code,
                               cuda_graphs, compile_model)
        with console.status("decoding video"):
            clip, video_s = decoding.result()
    for note in clip.notes:
        console.print(f"note: {note}")
    fit.check_clip(clip, max_pixels, info, **limits)  # exact: the frames as decoded
    live = not json_out and not quiet and sys.stdout.isatty()  # a terminal watches the answer being written
    waiting = "answering (--compile: the first answer compiles, for minutes on a 7B model)" if compile_model \
        else "answering"
    with console.status(waiting) as status:
        def show(piece: str) -> None:
            status.stop()
            sys.stdout.write(piece)
            sys.stdout.flush()

        answer = answer_mod.ask(loaded, clip, question, cfg, max_new_tokens=max_new_tokens, max_pixels=max_pixels,
                                store=PriorStore(use_disk=not no_prior_cache), warmup=warmup,
                                on_text=show if live else None, sampling=pick)
    record = report.ask_record(loaded, clip, cfg, answer)
    record.update(warmup=warmup, video_seconds=video_s, load_seconds=load_s)
    if json_out:
        report.print_json(record)
    elif live:
        typer.echo("" if answer.text else "(empty answer)")
    else:
        typer.echo(answer.text)
    if not quiet:
        console.print(report.ask_table(record, width=console.width))


@app.command(short_help="Time every method against stock transformers, side by side.")
@prune_options(skip=("method", "ratio"))
def bench(
    video: Annotated[Optional[str], typer.Option(
        help="A real video; default: a synthetic one of the layout below.")] = None,
    frames: Frames = 32,
    height: Annotated[int, typer.Option(help="Synthetic video frame height in pixels.")] = 392,
    width: Annotated[int, typer.Option(help="Synthetic video frame width in pixels.")] = 784,
    question: Annotated[str, typer.Option(help="The question asked in every run.")] = "What happens in this video?",
    model: Model = DEFAULT_MODEL,
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    random_weights: RandomWeights = False, trust_remote_code: TrustRemoteCode = False,
    methods: Annotated[str, typer.Option(
        help="Comma list of methods to compare: sharp, fastv, evs, random, none, and the stock path: transformers "
             "(generate(), dynamic cache), transformers-static (static cache, compiled on CUDA: the first call "
             "compiles for a minute or more).")] = "transformers,none,fastv,random,sharp",
    ratio: Annotated[Optional[list[str]], typer.Option(help="Ratio(s) kept; repeat or give a comma list.")] = None,
    prune: PruneConfig = PruneConfig(),
    max_pixels: MaxPixels = None, max_visual_tokens: MaxVisualTokens = None, decoder: Decoder = "auto",
    warmup: Annotated[int, typer.Option(help="Untimed runs per row before timing.")] = 1,
    iters: Annotated[int, typer.Option(help="Timed runs per row (the median is reported).")] = 5,
    decode_tokens: Annotated[int, typer.Option(help="Tokens each answer decodes (EOS ignored, so every row decodes as "
                                               "many); end to end = vision + prefill + these (0: prefill only).")] = 64,
    cuda_graphs: Annotated[bool, typer.Option(help="Replay the pruned layers from CUDA graphs (CUDA only).")] = True,
    compile_model: Compile = False,
    json_out: JsonOut = False,
    output_json: Annotated[Optional[str], typer.Option(help="Also write the JSON result to this file.")] = None,
    plot: Annotated[Optional[str], typer.Option(
        help="Write a PNG of speed-up and memory vs ratio (needs matplotlib).")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No table or progress on stderr.")] = False,
):
    """Every method and the stock transformers path side by side, on the same inputs: end-to-end time,
    prefill, decode, FLOPs, memory and agreement with the unpruned model."""
    from sharp_cli.peers import PEERS
    from sharp_cli.prune.config import METHODS

    method_list = split_list([methods], str, "--methods")
    if not method_list:
        raise UsageError("--methods: give at least one method")
    for m in method_list:
        if m not in (*METHODS, *PEERS):
            raise UsageError(f"--methods: unknown method '{m}'; choose from {', '.join((*METHODS, *PEERS))}")
    ratios = split_list(ratio or ["0.15"], float, "--ratio")
    from dataclasses import replace

    base = replace(prune, ratio=ratios[0] if ratios else 0.15).validate()
    for r in ratios:
        replace(prune, ratio=r).validate()
    if iters < 1 or warmup < 0 or decode_tokens < 0:
        raise UsageError("--iters must be >= 1, --warmup and --decode-tokens >= 0")
    if frames < 1 or height < 28 or width < 28:
        raise UsageError("--frames must be >= 1 and --height/--width >= 28")
    check_output_file(output_json, "--output-json")
    check_output_file(plot, "--plot")
    if any(m in METHODS and m != "none" for m in method_list):  # --layer against its depth, before torch loads
        from sharp_cli import model_files

        base = model_files.check_layer(model, base, random_weights)
    console = stderr_console(quiet)
    from sharp_cli import bench as bench_mod
    from sharp_cli import video as video_mod

    quiet_transformers()
    from sharp_cli import loading, report
    from sharp_cli.clip_budget import ClipBudget
    from sharp_cli.models import adapter_for

    config = loading.model_config(model, random_weights=random_weights, trust_remote_code=trust_remote_code)
    if any(m in METHODS and m != "none" for m in method_list):  # --layer against the model, before loading weights
        if "evs" in method_list:  # refused on some families (Qwen3-VL): now, not after the other rows
            loading.check_prune_config(model, replace(base, method="evs"), config=config)
        base = loading.check_prune_config(model, base, config=config)
    fit = ClipBudget(adapter_for(config), config, loading.saved_video_bound(model, random_weights=random_weights))
    limits = dict(question=question, max_new_tokens=decode_tokens, max_visual_tokens=max_visual_tokens)
    started = time.perf_counter()
    info = video_mod.probe(video) if video else None
    if video:
        video_args = fit.plan(info, dict(frames=frames, max_pixels=max_pixels, backend=decoder), **limits)
        clip = video_mod.load_video(video, **video_args)
    else:
        clip = bench_mod.synthetic_clip(frames, height, width)
    video_s = time.perf_counter() - started if video else None
    fit.check_clip(clip, max_pixels, info, **limits)
    loaded, load_s = _load(console, model, device, quant, dtype, random_weights, trust_remote_code, cuda_graphs,
                           compile_model)
    from rich.progress import Progress

    rows = bench_mod.plan_rows(method_list, ratios)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(rows))
        result = bench_mod.run(loaded, clip, question, base, method_list, ratios, warmup=warmup, iters=iters,
                               decode_tokens=decode_tokens, max_pixels=max_pixels,
                               progress=lambda: progress.advance(task),
                               extra={"load_seconds": load_s, "video_seconds": video_s})
    if output_json:
        from sharp_cli.jsonl import plain

        write_atomic(output_json, json.dumps(result, indent=2, default=plain) + "\n")
    if plot:
        bench_mod.plot(result, plot)
    if json_out:
        report.print_json(result)
    if not quiet:
        console.print(bench_mod.table(result, width=console.width))


def _timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took)."""
    started = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - started


def _load(console, model, device, quant, dtype, random_weights, trust_remote_code, cuda_graphs, compile_model=False):
    """(the loaded model, seconds it took): a model load is part of what a one-off question costs."""
    from sharp_cli import loading

    started = time.perf_counter()
    with console.status(f"loading {model}"):
        loaded = loading.load(model, device=device, quant=quant, dtype=dtype, random_weights=random_weights,
                              trust_remote_code=trust_remote_code)
    loaded.use_compile(compile_model)
    return loaded.use_cuda_graphs(cuda_graphs), time.perf_counter() - started


from sharp_cli.evaluate.commands import eval_command, synth_command  # noqa: E402
from sharp_cli.evaluate.diagnose_command import diagnose_command  # noqa: E402

app.command("eval", short_help="Multiple-choice accuracy per method and ratio.")(eval_command)
app.command("synth", short_help="Write a synthetic needle-in-the-video QA set.")(synth_command)
app.command("diagnose",
            short_help="May this model judge a pruning method? Its shallow attention, checked.")(diagnose_command)
from sharp_cli.batch import batch_command  # noqa: E402
from sharp_cli.env_command import env_command  # noqa: E402
from sharp_cli.serve.command import serve_command  # noqa: E402

app.command("batch", short_help="Answer a JSON-lines file of questions, one line each.")(batch_command)
app.command("serve", short_help="Serve a model over an OpenAI-compatible HTTP API.")(serve_command)
app.command("env", short_help="Versions of the libraries, video decoders, CUDA and the GPU.")(env_command)


def main():
    app()


if __name__ == "__main__":
    main()

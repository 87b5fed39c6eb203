"""`sharp diagnose`, the command (light: torch is imported when it runs). The checks: acceptance.py."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sharp_cli.options import Decoder, Device, Dtype, Fps, Frames, JsonOut, MaxFrames, MaxPixels, Model, Quant
from sharp_cli.prune.config import field_help

Layer = Annotated[Optional[int], typer.Option(help=field_help("layer"), show_default=False)]


def diagnose_command(
    data: Annotated[str, typer.Argument(help='Questions: a file, or a benchmark folder (as sharp eval reads).')],
    model: Model = "sharp-small",
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    layer: Layer = None,
    deep_layer: Annotated[Optional[int], typer.Option(
        help='The deep K the shallow one is compared with (default: half the depth).', show_default=False)] = None,
    limit: Annotated[int, typer.Option('--n', help='Questions to use (the first N).')] = 200,
    accuracy: Annotated[bool, typer.Option(help='Run the pruning checks (5 answers per labelled question).')] = True,
    frames: Frames = 32, fps: Fps = None, max_frames: MaxFrames = 768, max_pixels: MaxPixels = None,
    decoder: Decoder = "auto",
    strict: Annotated[bool, typer.Option('--strict', help='Exit 1 if any check fails.')] = False,
    json_out: JsonOut = False,
):
    """Acceptance checks: does the model's shallow attention behave like a real video LLM's?"""
    from sharp_cli.errors import SharpError, UsageError
    from sharp_cli.evaluate import formats
    from sharp_cli.options import quiet_transformers, stderr_console

    if limit < 1:
        raise UsageError(f"--n must be >= 1, got {limit}")
    console = stderr_console(False)
    dataset = formats.load(data)
    items = dataset.items[:limit]
    quiet_transformers()
    from sharp_cli import loading, report
    from sharp_cli import video as video_mod
    from sharp_cli.evaluate import acceptance
    from sharp_cli.prune.config import PruneConfig

    cfg = loading.check_prune_config(model, PruneConfig(method="fastv", layer=layer))
    with console.status(f"loading {model}"):
        loaded = loading.load(model, device=device, quant=quant, dtype=dtype)
    deep = deep_layer if deep_layer is not None else max(cfg.layer + 1, loaded.num_layers // 2)
    if not cfg.layer < deep < loaded.num_layers:
        raise UsageError(f"--deep-layer must be between K={cfg.layer} and {loaded.num_layers - 1}, got {deep}")
    from sharp_cli.letters import build_prompt

    with console.status(f"decoding {len(items)} videos"):
        clips = [video_mod.load_video(i.video, frames=frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels,
                                      backend=decoder) for i in items]
    with console.status("attention statistics"):
        prompts = [build_prompt(i.question, i.options) if i.options else i.question for i in items]
        means, checks = acceptance.attention_checks(loaded, list(zip(clips, prompts)), cfg.layer, max_pixels)
    pruning = {}
    if accuracy:
        with console.status("pruning checks"):
            pruning, more = acceptance.pruning_checks(loaded, list(zip(items, clips)), cfg.layer, deep,
                                                      max_pixels=max_pixels)
        checks += more
    result = {"model": model, "data": data, "questions": len(items), "layer": cfg.layer, "deep_layer": deep,
              "frames": frames, "checks": checks, "passed": all(c["passed"] for c in checks),
              "attention": {name: {str(k): v for k, v in per.items()} for name, per in means.items()},
              "pruning": pruning}
    if json_out:
        report.print_json(result)
    console.print(acceptance.table(result))
    if strict and not result["passed"]:
        raise SharpError(f"{sum(not c['passed'] for c in checks)} of {len(checks)} acceptance checks failed")

"""sharp's model load against plain transformers, each in a fresh process.

    python -m scripts.load_bench --folder F [--dtype bfloat16] [--device auto] [--quant auto]
                                 [--repeats 3] [--prefill] [--json out.json]
    python -m scripts.load_bench --folder F --make Qwen/Qwen2.5-VL-7B-Instruct [--layers N]

--make writes F first: the shipped config's architecture with random weights (bf16 safetensors),
its processor and tokenizer files, with N decoder layers where the whole one does not fit.

Each repeat starts two processes, one per side, alternately:
- stock: `AutoModelForImageTextToText.from_pretrained(F, dtype=...)` (on CUDA with device_map on the
  GPU and, for nf4/int8, bitsandbytes' plain config) + `AutoProcessor.from_pretrained(F)`;
- sharp: what `sharp ask` does before its first question (cli.ask): the config checks from JSON and
  from transformers, the clip budget's saved bound, `loading.load` (from_pretrained, processor,
  attention registration, kernel swaps, vision MLP padding, gc freeze) and the CUDA-graph/compile
  switches.
One untimed round of both sides runs first, so that the page cache holds the weights for both.
Reported: "ready" = seconds from the process's launch (interpreter start and imports included) to
model and processor ready; "load" = from the first model call (the first config read) to ready; and
per-step seconds of sharp's side (from_pretrained, processor, padding ...) that attribute the
difference. With --prefill both sides then answer one question about a synthetic clip twice
(1 new token): the first one in a fresh process carries the one-off work (kernel loads, cuDNN/cuBLAS
set-up, sharp's prior pass or its cache lookup), the second one does not. sharp's prior cache lives in
a folder of this run (the warm-up round fills it, as a user's first question does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What happens in this video?"
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="a model folder on disk (safetensors, processor files)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--quant", default="auto", choices=("auto", "nf4", "int8", "none"),
                        help="auto: nf4 on CUDA when bitsandbytes imports, else none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", action="store_true", help="also time the first and second question")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--json", dest="json_out", help="write the runs and the medians to this file")
    parser.add_argument("--mlp-widths", action="store_true",
                        help="instead: time one vision MLP at its stock and its padded width (models/vision_mlp.py)")
    parser.add_argument("--tokens", type=int, default=1024, help="--mlp-widths: vision tokens per product")
    parser.add_argument("--make", metavar="MODEL", help="first write --folder: this shipped config, random weights")
    parser.add_argument("--layers", type=int,
                        help="--make: decoder layers (default: the config's; more than sharp's pruning layer)")
    parser.add_argument("--child", choices=("stock", "sharp"), help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = (stock_child if args.child == "stock" else sharp_child)(args)
        print("LOAD_BENCH " + json.dumps(result), flush=True)
        return 0
    if args.make:
        make_folder(args.make, args.folder, args.layers)
    if not (Path(args.folder) / "config.json").exists():
        parser.error(f"no config.json in {args.folder}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.device, args.quant = resolve(args.device, args.quant)
    if args.mlp_widths:
        print(mlp_widths(args))
        return 0
    runs = measure(args)
    summary = summarize(runs)
    print(table(summary, args))
    if args.json_out:
        setup = {k: getattr(args, k) for k in ("folder", "dtype", "device", "quant", "repeats", "prefill",
                                               "frames", "height", "width")}
        Path(args.json_out).write_text(json.dumps({"setup": setup, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


def make_folder(model: str, folder: str, layers: int | None) -> None:
    """A loadable folder of `model`'s shipped architecture with random weights (random_init.py)."""
    from sharp_cli.models import random_init

    config = random_init.load_config(model)
    if layers:
        text = getattr(config, "text_config", config)
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):  # one entry per layer, checked against the count
            text.layer_types = text.layer_types[:layers]
    import torch

    # On the GPU: the CPU's initialisation of 8B parameters took over 210 s on the H100 machine's 16 cores.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    random_init.write_random_model(config, folder, dtype="bfloat16", device=device,
                                   generation_config=random_init.load_generation_config(model))
    print(f"wrote {folder}", file=sys.stderr)


def resolve(device: str, quant: str) -> tuple[str, str]:
    import importlib.util

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if quant == "auto":
        quant = "nf4" if device == "cuda" and importlib.util.find_spec("bitsandbytes") else "none"
    return device, quant


def measure(args) -> list[dict]:
    """One untimed round, then `repeats` rounds of (stock, sharp) in fresh processes."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="load-bench-cache-") as cache:
        env = dict(os.environ, SHARP_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        for round_ in range(args.repeats + 1):
            for side in ("stock", "sharp"):
                result = child(side, args, env)
                if round_:
                    runs.append(result)
                print(f"{'warm-up' if not round_ else f'run {round_}'} {side}: ready {result['ready_s']:.2f} s",
                      file=sys.stderr, flush=True)
    return runs


def child(side: str, args, env: dict) -> dict:
    command = [sys.executable, "-m", "scripts.load_bench", "--child", side, "--folder", args.folder,
               "--dtype", args.dtype, "--device", args.device, "--quant", args.quant, "--frames", str(args.frames),
               "--height", str(args.height), "--width", str(args.width), "--launched", repr(time.time())]
    if args.prefill:
        command.append("--prefill")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOAD_BENCH ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"the {side} process failed (exit {done.returncode})")
    return dict(json.loads(lines[-1][len("LOAD_BENCH "):]), side=side)


class Steps:
    """Seconds per named step, by wrapping module or class attributes (calls nest: a step inside
    another is counted in both)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*a, **k):
            started = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, attr, timed)


def stock_child(args) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    imported = time.time()
    dtype = getattr(torch, args.dtype)
    kwargs = dict(dtype=dtype)
    if args.device == "cuda":
        kwargs["device_map"] = {"": 0}
    if args.quant != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype) if args.quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    started = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args.folder, **kwargs).eval()
    loaded_s = time.perf_counter() - started
    between = time.perf_counter()
    processor = AutoProcessor.from_pretrained(args.folder)
    result = finish(args, imported, started, {"from_pretrained": loaded_s,
                                              "processor": time.perf_counter() - between})
    if args.prefill:
        clip = synthetic_frames(args)
        result["questions_s"] = [stock_question(model, processor, clip, args.device) for _ in range(2)]
    return result


def stock_question(model, processor, frames, device: str) -> float:
    import torch

    sync(device)
    started = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt", do_sample_frames=False,
                       video_metadata=[{"total_num_frames": len(frames), "fps": 2.0,
                                        "frames_indices": list(range(len(frames)))}]).to(model.device)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    sync(device)
    return time.perf_counter() - started


def sharp_child(args) -> dict:
    """The steps of cli.ask up to the first question, in its order."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sharp_cli import loading, model_files
    from sharp_cli.clip_budget import ClipBudget
    from sharp_cli.models import adapter_for, vision_mlp
    from sharp_cli.prune.config import PruneConfig

    imported = time.time()
    steps = Steps()
    for owner, attr, label in ((model_files, "check_layer", "config checks (JSON)"),
                               (loading, "read_config", "read_config"),
                               (loading, "quantization_config", "quantization config (imports bitsandbytes)"),
                               (loading, "saved_video_bound", "saved_video_bound"),
                               (AutoModelForImageTextToText, "from_pretrained", "from_pretrained"),
                               (AutoProcessor, "from_pretrained", "processor"),
                               (loading, "ready", "ready (all of it)"),
                               (vision_mlp, "pad_gated_mlps", "ready: vision MLP padding"),
                               (loading, "_freeze_gc", "ready: gc freeze")):
        steps.wrap(owner, attr, label)
    started = time.perf_counter()
    cfg = PruneConfig().validate()
    model_files.check_layer(args.folder, cfg)
    config = loading.model_config(args.folder)
    cfg = loading.check_prune_config(args.folder, cfg, config=config)
    ClipBudget(adapter_for(config), config, loading.saved_video_bound(args.folder))
    loaded = loading.load(args.folder, device=args.device, quant=args.quant, dtype=args.dtype)
    loaded.use_compile(False)
    loaded.use_cuda_graphs(True)
    result = finish(args, imported, started, steps.seconds)
    if args.prefill:
        asked = [sharp_question(loaded, cfg, args) for _ in range(2)]
        result["questions_s"] = [total for total, _ in asked]
        result["steps"].update({f"{('first', 'second')[i]} question: {name}": seconds
                                for i, (_, phases) in enumerate(asked) for name, seconds in phases.items()})
    return result


def sharp_question(loaded, cfg, args) -> tuple[float, dict]:
    from sharp_cli import answer
    from sharp_cli.bench import synthetic_clip
    from sharp_cli.prune.prior import PriorStore

    clip = synthetic_clip(args.frames, args.height, args.width)
    sync(args.device)
    started = time.perf_counter()
    got = answer.ask(loaded, clip, QUESTION, cfg, max_new_tokens=1, store=PriorStore())
    sync(args.device)
    total = time.perf_counter() - started
    # where a fresh process's first question goes (issue 26: CUDA warm-up, the prior pass, captures)
    phases = {"processor": got.prepare_seconds, "vision": got.vision_seconds, "prior pass": got.prior.seconds,
              "prefill": got.prefill.seconds, "decode": got.decoded.seconds}
    return total, phases


def synthetic_frames(args):
    from sharp_cli.bench import synthetic_clip  # numpy only: the same frames as sharp's side

    return synthetic_clip(args.frames, args.height, args.width).frames


def finish(args, imported: float, started: float, steps: dict) -> dict:
    sync(args.device)
    now = time.perf_counter()
    return {"ready_s": time.time() - args.launched, "imports_s": imported - args.launched,
            "load_s": now - started, "steps": steps}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def summarize(runs: list[dict]) -> dict:
    """Per side: the median and range of every figure over the repeats."""
    out: dict[str, dict] = {}
    for side in ("stock", "sharp"):
        mine = [r for r in runs if r["side"] == side]
        figures: dict[str, list[float]] = {}
        for run in mine:
            for key in ("ready_s", "imports_s", "load_s"):
                figures.setdefault(key, []).append(run[key])
            for name, value in run["steps"].items():
                figures.setdefault(name, []).append(value)
            for i, value in enumerate(run.get("questions_s", [])):
                figures.setdefault(("first", "second")[i] + " question", []).append(value)
        out[side] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in figures.items()}
    return out


def table(summary: dict, args) -> str:
    head = (f"{args.folder} | {args.device}, {args.dtype}, quant {args.quant} | median (min-max) of "
            f"{args.repeats} fresh processes per side, page cache warm for both")
    names = ["ready_s", "imports_s", "load_s"] + sorted(
        {k for side in summary.values() for k in side} - {"ready_s", "imports_s", "load_s"},
        key=lambda k: (k.endswith("question"), k))
    labels = {"ready_s": "launch to ready", "imports_s": "launch to imports done",
              "load_s": "first model call to ready"}
    lines = [head, "", "| seconds | stock transformers | sharp |", "|---|---|---|"]
    for name in names:
        cells = []
        for side in ("stock", "sharp"):
            fig = summary[side].get(name)
            cells.append(f"{fig['median']:.2f} ({fig['min']:.2f}-{fig['max']:.2f})" if fig else "-")
        lines.append(f"| {labels.get(name, name)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def mlp_widths(args, rounds: int = 6) -> str:
    """Median ms of one gated vision MLP (gate, up, SiLU, down) over `args.tokens` tokens at the
    config's width and at vision_mlp.ALIGN's, alternately, with the same random weights."""
    import torch
    import torch.nn.functional as F

    from sharp_cli.models import vision_mlp

    vision = json.loads((Path(args.folder) / "config.json").read_text())["vision_config"]
    hidden, width = vision["hidden_size"], vision["intermediate_size"]
    padded = -(-width // vision_mlp.ALIGN) * vision_mlp.ALIGN
    kind = dict(device=args.device, dtype=getattr(torch, args.dtype))
    x = torch.randn(args.tokens, hidden, **kind)
    weights = {w: (torch.randn(w, hidden, **kind), torch.randn(w, hidden, **kind), torch.randn(hidden, w, **kind))
               for w in (width, padded)}
    times: dict[int, list[float]] = {width: [], padded: []}
    for _ in range(rounds + 1):
        for w, (gate, up, down) in weights.items():
            sync(args.device)
            started = time.perf_counter()
            F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
            sync(args.device)
            times[w].append((time.perf_counter() - started) * 1e3)
    cells = [f"width {w}: {statistics.median(t[1:]):.2f} ms" for w, t in times.items()]  # the first is warm-up
    return f"vision MLP, {args.tokens} tokens, {args.device} {args.dtype}: " + ", ".join(cells)


if __name__ == "__main__":
    sys.exit(main())

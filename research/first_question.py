"""Where a fresh process's first question and sharp's extra import time go (CUDA; issue 26 item 4).

scripts/load_bench.py measured on an H100 (bf16, 4 frames): launch to imports done 13.60 s against
stock's 11.79 s, and a first question of 1.61 s (vision 0.99 s, prefill 0.54 s) against stock's
1.02 s, where the second takes 0.15 s. This prints:
1. the import time of stock's modules alone and with sharp's on top, in fresh processes, and the
   modules that sharp's part spends most on (`python -X importtime`);
2. the first and second question's phases in one process, and a cProfile of the first question:
   the functions with the most cumulative and own time (Triton's kernel loading, cuBLAS handles,
   the attention kernels' first calls all show up by name).

    python -m research.first_question [--quant none] [--frames 4]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time

STOCK = "from transformers import AutoModelForImageTextToText, AutoProcessor"
SHARP = (STOCK + "; from sharp_cli import loading, model_files; from sharp_cli.clip_budget import ClipBudget; "
         "from sharp_cli.models import adapter_for, vision_mlp; from sharp_cli.prune.config import PruneConfig")


CHILD = f"""
import sys, time
started = time.perf_counter()
{STOCK}
stock = time.perf_counter() - started
before = set(sys.modules)
started = time.perf_counter()
{SHARP.split("; ", 1)[1]}
import torch
print("IMPORTS", stock, time.perf_counter() - started, torch.cuda.is_initialized(), *sorted(set(sys.modules) - before))
"""


def imports() -> None:
    """Stock's imports, then sharp's on top in the same fresh process (the second of two runs: the
    page cache warm), whether sharp's imports started CUDA, and the largest of the modules they added."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD], capture_output=True, text=True,
                              check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("IMPORTS"))
    _, stock, sharp, cuda, *added = line.split()
    print(f"imports: stock {float(stock):.2f} s, then sharp's {float(sharp):.2f} s (CUDA initialised by "
          f"then: {cuda}; {len(added)} modules added)", flush=True)
    added = set(added)
    rows = []
    for row in done.stderr.splitlines():
        parts = row.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and parts[2].strip() in added:
            rows.append((int(parts[1]), int(parts[0].split(":")[1]), parts[2].rstrip()))
    print("the modules sharp's imports added, largest cumulative (us, own us):")
    for cumulative, own, name in sorted(rows, reverse=True)[:20]:
        print(f"  {cumulative:>9} {own:>8} {name}")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def questions(args) -> None:
    from sharp_cli import answer, loading
    from sharp_cli.bench import synthetic_clip
    from sharp_cli.prune import PruneConfig
    from sharp_cli.prune.prior import PriorStore

    started = time.perf_counter()
    loaded = loading.load(args.model, quant=args.quant, random_weights=True)
    sync()
    print(f"load (random weights) {time.perf_counter() - started:.2f} s", flush=True)
    cfg = loaded.resolve_prune(PruneConfig())
    clip = synthetic_clip(args.frames, 392, 784)
    for label in ("first", "second"):
        profiler = cProfile.Profile() if label == "first" else None
        sync()
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        got = answer.ask(loaded, clip, "What happens in this video?", cfg, max_new_tokens=1,
                         store=PriorStore(use_disk=False))
        sync()
        if profiler:
            profiler.disable()
        print(f"{label} question {time.perf_counter() - t0:.3f} s: processor {got.prepare_seconds:.3f}, vision "
              f"{got.vision_seconds:.3f}, prior {got.prior.seconds:.3f}, prefill {got.prefill.seconds:.3f}, "
              f"decode {got.decoded.seconds:.3f} (cProfile on: {profiler is not None})", flush=True)
        if profiler:
            for key in ("cumulative", "tottime"):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(30)
                text = out.getvalue()
                print(f"--- first question by {key}\n" + text[text.find("ncalls"):], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--quant", default="none")
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    imports()
    questions(args)


if __name__ == "__main__":
    main()

"""Where the vision encoder's time goes (random weights, the real architecture), and what a
compiled tower saves.

    python scripts/profile_vision.py [--model Qwen/Qwen2.5-VL-7B-Instruct] [--frames 32] [--compile]

Prints the encoder's time (median of 5 after a warm-up, synchronised clock) with sharp's packed
attention and with transformers' per-window loop, the FLOPs of its matrix products and the rate
that gives, the GPU kernel time split by kind (torch.profiler) with the ten costliest kernels,
and, with --compile, the same with the tower's blocks compiled (first call = compile time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from profile_decode import kernel_split  # scripts/ is on the path when this runs as a script

from sharp_cli import engine, loading
from sharp_cli.bench import synthetic_clip

KINDS = (("attention", ("fmha", "attention", "flash", "softmax")),
         ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")),
         ("elementwise", ("elementwise", "vectorized", "reduce", "norm", "copy", "cat", "index", "fill", "triton")))


def timed(fn, n=5) -> float:
    fn()
    times = []
    for _ in range(n):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_flops(visual, patches: int) -> float:
    """2 x (weights of every Linear in the blocks) x patches, plus the merger on a quarter of them."""
    blocks = sum(m.weight.numel() for m in visual.blocks.modules() if isinstance(m, torch.nn.Linear))
    merger = sum(m.weight.numel() for m in visual.merger.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * (blocks * patches + merger * patches / 4)


def report(label: str, fn, flops: float) -> None:
    ms = timed(fn)
    split, top = kernel_split(fn, KINDS)
    print(f"  {label}: {ms:.1f} ms; matmul FLOPs {flops / 1e12:.1f} T = {flops / ms / 1e9:.0f} TFLOP/s overall")
    print("    kernel time: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    for t, count, name in top:
        print(f"    {t:8.2f} ms  x{count:<5d} {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    loaded = loading.load(args.model, device="auto", quant="none", random_weights=args.model != "sharp-tiny")
    clip = synthetic_clip(args.frames, 392, 784)
    inputs = engine.prepare(loaded, clip, "What happens in this video?")
    visual = loaded.model.model.visual
    patches = int(inputs["pixel_values_videos"].shape[0])
    flops = matmul_flops(visual, patches)
    dtypes = sorted({str(p.dtype) for p in visual.parameters()})
    print(f"{args.model} vision tower on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}: {patches} patches, "
          f"pixel_values {inputs['pixel_values_videos'].dtype}, weights {dtypes}, "
          f"attention {visual.config._attn_implementation}, tf32 {torch.backends.cuda.matmul.allow_tf32}")

    def run():
        with torch.inference_mode():
            loaded.adapter.vision(loaded.model, inputs)

    report("packed attention, padded MLPs (sharp)", run, flops)
    from sharp_cli import peers

    with peers.stock_attention(loaded):
        report("per-window loop, stock MLPs, cuDNN attention (transformers)", run, flops)
    if args.compile:
        loaded.use_compile(True)  # what --compile does (sharp_cli/compiled.py)

        def run_compiled():
            with loaded.compiled_vision.active():
                run()

        started = time.perf_counter()
        run_compiled()
        sync()
        print(f"  compiled blocks: first call {time.perf_counter() - started:.1f} s")
        report("packed attention, compiled blocks", run_compiled, flops)


if __name__ == "__main__":
    main()

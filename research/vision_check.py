"""The vision tower on a GPU: sharp's features against the stock tower's, and its time eager, fused
and graphed (issue 26 item 3). Needs CUDA; ~1 minute on an H200.

    python -m research.vision_check [-m Qwen/Qwen2.5-VL-7B-Instruct] [--frames 32] [--json OUT]
    python -m research.vision_check --device cpu --frames 2 --small-frames 0 --height 56 --width 112 --iters 1
      (a dry run of the script on a CPU: no graphs there, so it reports FAILED)

Builds the tower alone (random bf16 weights, the checkpoint's architecture) and runs it on random
pixels of `--frames` frames of 392x784 (32 frames of Qwen2.5-VL: grid 16x28x56, 25,088 patches), then
a small clip (4 frames) where launch gaps weigh more. Rows, one tower switched between them:

- stock: transformers' per-window SDPA loop, the stock MLP widths and classes, cuDNN attention (what
  peers.stock_attention gives the stock rows of `sharp bench`);
- padded: packed attention, MLPs padded, gate and up as two products (sharp before the fused MLP);
- fused: the same with gate and up as one product (SHARP_VISION_FUSED_MLP=1, loading.ready_vision);
- kernels: fused, with the norms and rotary embedding as Triton kernels (models/fused_vision.py,
  SHARP_FUSED_VISION=1; its SiLU * up kernel takes only MLPs whose gate and up are two products,
  sharp's default, so this row, built on the fused MLPs, runs without it);
- varlen: kernels, with each block's attention one varlen flash call (models/vision_attention.py,
  sharp's default; the rows above run with SHARP_VISION_VARLEN=0: gathered windows, copies back);
- graphed: varlen, replayed from a CUDA graph per shape (models/vision_graphs.py, SHARP_VISION_GRAPHS=1).

Features (the merger's output, what the LLM gets) of each row against stock: max |diff| and cosine;
and each row's and stock's distance from an fp32 reference (the same weights in float32, no TF32):
"within bf16 rounding" means a row is no further from fp32 than the stock bf16 tower is (RMS x1.5, max x3).
graphed against varlen eager is shown too (0 expected: the same kernels). Times: median of `--iters`
calls after one warm-up, synchronised wall clock; the graphed row's first call (warm-up + capture + check replay) apart.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

from scripts.profiler import sync, timed_wall
from sharp_cli import loading
from sharp_cli.models import fused_vision, gemv, random_init, vision_attention, vision_mlp
from sharp_cli.models.vision_graphs import VisionGraphs

SLACK = 1.5  # a row's RMS distance from fp32 may be this much of the stock bf16 tower's (max |diff|: twice that)


def tower_class(model_type: str):
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
    if model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return Qwen2VisionTransformerPretrainedModel
    if model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return Qwen3VLVisionModel
    raise SystemExit(f"no packed vision tower in {model_type}")


def build(name: str, device: torch.device):
    config = random_init.load_config(name)
    vc = config.vision_config
    vc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        visual = tower_class(config.model_type)._from_config(vc, dtype=torch.bfloat16)
    return visual.eval()


def pixels(visual, frames: int, height: int, width: int, device):
    """(pixels (patches, C*T*P*P) bf16, grid_thw (1, 3)) of random frames at the tower's token grid."""
    vc = visual.config
    factor = vc.patch_size * vc.spatial_merge_size
    grid = (-(-frames // vc.temporal_patch_size), height // factor * vc.spatial_merge_size,
            width // factor * vc.spatial_merge_size)
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                    generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    return x, torch.tensor([grid], device=device)


@contextmanager
def stock(visual):
    """transformers' own tower: per-window SDPA, stock widths and classes, cuDNN attention on."""
    saved, cudnn = visual.config._attn_implementation, torch.backends.cuda.cudnn_sdp_enabled()
    visual.config._attn_implementation = "sdpa"
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with vision_mlp.unpadded(visual), gemv.stock_linears(visual):
            yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        visual.config._attn_implementation = saved


def features(out) -> torch.Tensor:
    return out.pooler_output


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs": float((a - b).abs().max()), "rms": float((a - b).pow(2).mean().sqrt()),
            "cosine": float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)),
            "min_row_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())}


def reference_fp32(visual, x, grid) -> torch.Tensor:
    """The same weights in float32 (a copy; .float() separates the fused halves, so its MLPs run the
    stock products at the padded width, exact), packed attention, no TF32 anywhere."""
    ref = copy.deepcopy(visual).float()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = features(ref(x.float(), grid_thw=grid)).clone()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del ref
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


@contextmanager
def switched(name: str, value: str):
    """The environment switch `name` set to `value` for the duration (read at call time: vision_attention's
    varlen)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def reserved() -> int:
    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0


def run_shape(visual, graphs: VisionGraphs, frames: int, args, check: bool) -> dict:
    iters = args.iters
    x, grid = pixels(visual, frames, args.height, args.width, args.device)
    call = lambda: visual(x, grid_thw=grid)  # noqa: E731
    rows = {"stock": stock(visual), "padded": gemv.stock_linears(visual), "fused": fused_vision.stock_modules(visual),
            "kernels": nullcontext(), "varlen": nullcontext()}
    result = {"frames": frames, "grid": grid[0].tolist(), "patches": int(x.shape[0]), "rows": {}}
    outs = {}
    with torch.inference_mode():
        for name, context in rows.items():
            with switched(vision_attention.VARLEN_SWITCH, "1" if name == "varlen" else "0"), context:
                outs[name] = features(call()).clone()
                result["rows"][name] = {"ms": timed_wall(call, iters)}
        before = reserved()
        with switched(vision_attention.VARLEN_SWITCH, "1"), graphs.active():
            sync()
            started = time.perf_counter()
            outs["graphed"] = features(call()).clone()
            sync()
            first_ms = (time.perf_counter() - started) * 1000
            result["rows"]["graphed"] = {"ms": timed_wall(call, iters), "first_call_ms": first_ms,
                                         "reserved_growth_gib": (reserved() - before) / 2**30,
                                         "counts": dict(graphs.counts), "failed": list(graphs.failed.values())}
    for name in ("padded", "fused", "kernels", "varlen", "graphed"):
        result["rows"][name]["vs_stock"] = compare(outs[name], outs["stock"])
    result["graphed_vs_varlen_max_abs"] = compare(outs["graphed"], outs["varlen"])["max_abs"]
    ok = not graphs.failed and graphs.counts["replays"] > 0  # captured, checked against eager, replayed
    if check:
        ref = reference_fp32(visual, x, grid)
        floor = compare(outs["stock"], ref)
        result["stock_vs_fp32"] = floor
        for name in ("padded", "fused", "kernels", "varlen", "graphed"):
            mine = compare(outs[name], ref)
            result["rows"][name]["vs_fp32"] = mine
            ok &= mine["rms"] <= SLACK * floor["rms"] and mine["max_abs"] <= 2 * SLACK * floor["max_abs"]
    result["ok"] = bool(ok)
    return result


def report(result: dict) -> None:
    print(f"{result['frames']} frames, grid {result['grid']}, {result['patches']} patches: "
          f"{'ok' if result['ok'] else 'FAILED'}")
    if "stock_vs_fp32" in result:
        f = result["stock_vs_fp32"]
        print(f"  stock bf16 vs fp32 (bf16 rounding): max |diff| {f['max_abs']:.4g}, RMS {f['rms']:.4g}, "
              f"cosine {f['cosine']:.6f}")
    for name, row in result["rows"].items():
        line = f"  {name:8s} {row['ms']:8.1f} ms"
        if "first_call_ms" in row:
            line += (f" (first call {row['first_call_ms']:.0f} ms, reserved +{row['reserved_growth_gib']:.2f} GiB, "
                     f"{row['counts']}{', failed: ' + '; '.join(row['failed']) if row['failed'] else ''})")
        if "vs_stock" in row:
            s = row["vs_stock"]
            line += f"; vs stock max |diff| {s['max_abs']:.4g}, cosine {s['cosine']:.6f} (row min {s['min_row_cosine']:.5f})"
        if "vs_fp32" in row:
            line += f"; vs fp32 max |diff| {row['vs_fp32']['max_abs']:.4g}, RMS {row['vs_fp32']['rms']:.4g}"
        print(line)
    print(f"  graphed vs varlen eager: max |diff| {result['graphed_vs_varlen_max_abs']:.3g} (0 expected)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--small-frames", type=int, default=4, help="the second, small clip (0: none)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--height", type=int, default=392)
    ap.add_argument("--width", type=int, default=784)
    ap.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("research.vision_check needs CUDA (or --device cpu for a dry run)")
    started = time.perf_counter()
    visual = build(args.model, args.device)
    loading.use_shape_free_attention_kernels()  # sharp's rows: no cuDNN attention (stock() turns it on)
    os.environ[vision_mlp.SWITCH] = "1"  # the fused row is what it measures (off by default)
    os.environ[fused_vision.SWITCH] = "1"  # and the kernels row (off by default)
    loading.ready_vision(visual, args.device, torch.bfloat16)  # the graphed rows make their own VisionGraphs
    assert visual.config._attn_implementation == vision_attention.NAME
    fused = sum(hasattr(type(m), "stock_class") for m in visual.modules())
    gpu = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    print(f"{args.model} vision tower on {gpu}, torch {torch.__version__}: "
          f"{sum(p.numel() for p in visual.parameters()) / 1e6:.0f}M parameters, {fused} swapped modules, "
          f"built in {time.perf_counter() - started:.1f} s")
    results = []
    for frames, check in ((args.frames, True), (args.small_frames, False)):
        if frames:
            graphs = VisionGraphs(visual)  # a fresh cache per clip: its first call is timed
            results.append(run_shape(visual, graphs, frames, args, check))
            report(results[-1])
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "gpu": gpu, "results": results}, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

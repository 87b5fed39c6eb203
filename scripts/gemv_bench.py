"""One-token products of a text model's weights: cuBLAS (F.linear) against sharp's Triton kernel
(sharp_cli/models/gemv.py), per weight shape, in GB/s of weight read. CUDA only.

Every call is timed inside a CUDA graph (as the decode step runs), cycling through enough copies
of each weight that none is served from L2 (a decode step reads each weight once). Then one
layer's seven products in a row and the step's estimate: 28 layers plus the lm_head.

    python scripts/gemv_bench.py --model Qwen/Qwen2.5-VL-7B-Instruct --sweep --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharp_cli.models import gemv  # noqa: E402

L2_BYTES = 256 << 20  # copies of a weight span more than this: more than any GPU's L2


def shapes(config) -> dict[str, tuple[int, int, bool]]:
    """name -> (out, in, bias) of one decoder layer's products and the lm_head."""
    text = getattr(config, "text_config", config)
    h, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    bias = getattr(text, "attention_bias", True)
    return {"q": (q, h, bias), "k": (kv, h, bias), "v": (kv, h, bias), "o": (h, q, False),
            "gate": (inter, h, False), "up": (inter, h, False), "down": (h, inter, False),
            "lm_head": (text.vocab_size, h, False)}


def timed(fn, copies: int, reps: int = 10) -> float:
    """Median seconds of one call, from graphs of `copies` calls (one per weight copy)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / copies)
    return statistics.median(times)


def bench_shape(n: int, k: int, bias: bool, dtype, sweep: bool) -> dict:
    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(1, -(-L2_BYTES // nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
    biases = [torch.randn(n, device="cuda", dtype=dtype) if bias else None for _ in range(copies)]
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
    reference = torch.nn.functional.linear(x.float(), weights[0].float(),
                                           biases[0].float() if bias else None)
    row = {"out": n, "in": k, "bias": bias, "megabytes": nbytes / 1e6, "copies": copies}
    for name, fn in [("cublas", lambda i: torch.nn.functional.linear(x, weights[i], biases[i])),
                     ("triton", lambda i: gemv.gemv(x, weights[i], biases[i]))]:
        seconds = timed(fn, copies)
        error = (fn(0).float() - reference).abs().max().item()
        row[name] = {"us": seconds * 1e6, "gbps": nbytes / seconds / 1e9, "max_error": error}
    row["triton"]["sizes"] = list(gemv.block_sizes(n, k))
    if sweep:
        best = None
        for block_n, block_k, warps in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024), (4, 8)):
            if block_k > max(256, k):
                continue
            sizes = (block_n, block_k, warps)
            seconds = timed(lambda i: gemv.gemv(x, weights[i], biases[i], sizes), copies, reps=5)
            if best is None or seconds < best[0]:
                best = (seconds, sizes)
        row["best"] = {"us": best[0] * 1e6, "gbps": nbytes / best[0] / 1e9, "sizes": list(best[1])}
    del weights
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true", help="also try every block size, report the best")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    from sharp_cli.loading import model_config

    config = model_config(args.model, random_weights=True)
    dtype = getattr(torch, args.dtype)
    rows = {name: bench_shape(n, k, b, dtype, args.sweep) for name, (n, k, b) in shapes(config).items()}
    layers = getattr(config, "text_config", config).num_hidden_layers
    print(f"{torch.cuda.get_device_name()}, {args.model}, {args.dtype}: one-token products, median us (GB/s)")
    for name, row in rows.items():
        best = f"  best {row['best']['us']:7.1f} ({row['best']['gbps']:5.0f}) {row['best']['sizes']}" \
            if "best" in row else ""
        print(f"{name:8s} {row['out']:6d}x{row['in']:<6d} cublas {row['cublas']['us']:7.1f} "
              f"({row['cublas']['gbps']:5.0f})  triton {row['triton']['us']:7.1f} ({row['triton']['gbps']:5.0f})"
              f"{best}  err {row['cublas']['max_error']:.1e}/{row['triton']['max_error']:.1e}")
    step = {}
    for kernel in ("cublas", "triton") + (("best",) if args.sweep else ()):
        per_layer = sum(rows[n][kernel]["us"] for n in rows if n != "lm_head")
        step[kernel] = {"layer_us": per_layer, "step_ms": (per_layer * layers + rows["lm_head"][kernel]["us"]) / 1e3}
        print(f"{kernel:7s}: one layer {per_layer:7.1f} us, {layers} layers + lm_head {step[kernel]['step_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": args.model,
                                               "dtype": args.dtype, "rows": rows, "step": step}, indent=1))


if __name__ == "__main__":
    main()

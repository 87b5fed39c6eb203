"""One-token products of a text model's 4-bit weights, bitsandbytes' against sharp's kernel.

bitsandbytes' own product (matmul_4bit, what Linear4bit runs) against sharp's Triton kernel
(sharp_cli/models/gemv_nf4.py), per weight shape and for a whole decode step, in GB/s of bytes
read. CUDA only; no autotuning (the kernel's block sizes are a fixed table, `--sweep` times 36
others).

Weights are random, quantized by bitsandbytes itself (nf4, double quantization: what `--quant nf4`
loads). For each shape: the kernel's and bitsandbytes' products against the float64 product of
bitsandbytes' dequantized weight, and against each other (||a - b|| / ||b||, printed); then each
timed inside a CUDA graph (as the decode step runs), cycling through enough copies of the weight
that none is served from L2. Then a whole step: every layer's seven products in order, each layer
its own weights (3.4 GB for a 7B model), in one graph. Bytes: packed weights + absmax (+ the
nested absmax) + x + y + bias; GB/s against the ~4,300 an H200 copies.

    source scripts/gpu_setup.sh && python scripts/gemv_nf4_bench.py [--model Qwen/Qwen2.5-VL-7B-Instruct]
        [--sweep] [--rows 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_bench import L2_BYTES, shapes, timed  # noqa: E402

from sharp_cli.models import gemv_nf4  # noqa: E402

PEAK_GBPS = 4300  # what an H200 copies (docs/benchmarks.md)
SWEEP = [(bn, nb, w) for bn, nb, w in itertools.product((4, 8, 16, 32), (8, 16, 32), (2, 4, 8))]


def quantized(n: int, k: int, bias: bool, dtype, seed: int):
    """(packed, state, bias) of a random (n, k) weight quantized by bitsandbytes on the GPU."""
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.02
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen) * 0.02 if bias else None
    return packed, state, b


def nbytes(n: int, k: int, bias: bool, state, rows: int, dtype) -> int:
    """Bytes one product reads and writes."""
    size = torch.finfo(dtype).bits // 8
    blocks = n * k // state.blocksize
    absmax = blocks * (1 if state.nested else 4) + (-(-blocks // 256) * 4 if state.nested else 0)
    return n * k // 2 + absmax + rows * (k + n) * size + (n * size if bias else 0)


def products(x, packed, state, bias, sizes=None, shuffle=None):
    """name -> callable of one product, for both implementations."""
    import bitsandbytes as bnb

    return {"bnb": lambda: bnb.matmul_4bit(x, packed, quant_state=state, bias=bias),
            "sharp": lambda: gemv_nf4.gemv_4bit(x, packed, state, bias, sizes=sizes, shuffle=shuffle)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(n: int, k: int, bias: bool, dtype, rows: int) -> dict:
    """Errors of both products against bitsandbytes' dequantized weight in float64, and of the
    kernel (shuffle and table lookups) against bitsandbytes' product."""
    import bitsandbytes.functional as F

    packed, state, b = quantized(n, k, bias, dtype, seed=0)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    exact = x.double() @ F.dequantize_4bit(packed, state).double().T + (b.double() if bias else 0)
    ours, theirs = (fn() for fn in products(x, packed, state, b).values())
    table = gemv_nf4.gemv_4bit(x, packed, state, b, shuffle=False)
    poisoned = torch.full_like(ours, float("nan"))
    gemv_nf4.gemv_4bit(x, packed, state, b, out=poisoned)
    return {"sharp_vs_bnb": relative(ours, theirs), "sharp_vs_exact": relative(ours, exact),
            "bnb_vs_exact": relative(theirs, exact), "table_vs_bnb": relative(table, theirs),
            "all_written": not poisoned.isnan().any().item()}


def bench_shape(n: int, k: int, bias: bool, dtype, rows: int, sweep: bool) -> dict:
    copies_state = [quantized(n, k, bias, dtype, seed=1)]
    one = nbytes(n, k, bias, copies_state[0][1], rows, dtype)
    copies = max(1, -(-L2_BYTES // one))
    copies_state += [quantized(n, k, bias, dtype, seed=2 + i) for i in range(copies - 1)]
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    row = {"out": n, "in": k, "bias": bias, "megabytes": one / 1e6, "copies": copies,
           "sizes": list(gemv_nf4.block_sizes(n, k)), **check(n, k, bias, dtype, rows)}

    def time_it(which: str, **kw) -> dict:
        calls = [products(x, p, s, b, **kw)[which] for p, s, b in copies_state]
        seconds = timed(lambda i: calls[i](), copies)
        return {"us": seconds * 1e6, "gbps": one / seconds / 1e9}

    row["bnb"], row["sharp"] = time_it("bnb"), time_it("sharp")
    row["sharp_table"] = time_it("sharp", shuffle=False)
    if sweep:
        tried = {}
        for sizes in SWEEP:
            try:
                tried[sizes] = time_it("sharp", sizes=sizes)["us"]
            except Exception as exc:  # noqa: BLE001 - a size Triton cannot build (registers): skip it
                print(f"  {n}x{k} {sizes}: {type(exc).__name__}", file=sys.stderr)
        best = min(tried, key=tried.get)
        row["best"] = {"us": tried[best], "gbps": one / tried[best] * 1e6 / 1e9, "sizes": list(best)}
        row["sweep"] = {",".join(map(str, s)): us for s, us in tried.items()}
    del copies_state
    torch.cuda.empty_cache()
    return row


def bench_step(model_shapes: dict, layers: int, dtype, rows: int) -> dict:
    """A decode step's 4-bit products: every layer's own weights, in order, one graph."""
    weights = [[quantized(n, k, b, dtype, seed=100 + 10 * layer + j)
                for j, (n, k, b) in enumerate(model_shapes.values())] for layer in range(layers)]
    x = {k: torch.randn(rows, k, device="cuda", dtype=dtype) for _, k, _ in model_shapes.values()}
    total = sum(nbytes(n, k, b, s, rows, dtype) for layer in weights for (n, k, b), (_, s, _)
                in zip(model_shapes.values(), layer))
    result = {"layers": layers, "gigabytes": total / 1e9}
    for which in ("bnb", "sharp"):
        calls = [products(x[k], p, s, b)[which] for layer in weights
                 for (n, k, _), (p, s, b) in zip(model_shapes.values(), layer)]
        seconds = timed(lambda _: [call() for call in calls], 1, reps=20)
        result[which] = {"ms": seconds * 1e3, "gbps": total / seconds / 1e9}
    del weights
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=1, help="tokens a product (1: decode)")
    parser.add_argument("--sweep", action="store_true", help="also time every size in SWEEP, report the best")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_nf4_bench.py needs a CUDA GPU")

    from sharp_cli.loading import model_config

    config = model_config(args.model, random_weights=True)
    dtype = getattr(torch, args.dtype)
    layer_shapes = {name: s for name, s in shapes(config).items() if name != "lm_head"}  # lm_head stays bf16
    layers = getattr(config, "text_config", config).num_hidden_layers
    rows = {name: bench_shape(n, k, b, dtype, args.rows, args.sweep) for name, (n, k, b) in layer_shapes.items()}
    print(f"{torch.cuda.get_device_name()}, {args.model}, nf4 + double quant, {args.dtype}, {args.rows} row(s): "
          f"median us a product (GB/s; {PEAK_GBPS} = the memory's rate)")
    print("errors ||a - b|| / ||b||: sharp vs bnb, sharp vs float64, bnb vs float64, sharp's table lookup vs bnb")
    for name, row in rows.items():
        best = f"  best {row['best']['us']:6.1f} ({row['best']['gbps']:5.0f}) {row['best']['sizes']}" \
            if "best" in row else ""
        print(f"{name:5s} {row['out']:6d}x{row['in']:<6d} {row['megabytes']:6.2f} MB  bnb {row['bnb']['us']:6.1f} "
              f"({row['bnb']['gbps']:5.0f})  sharp {row['sharp']['us']:6.1f} ({row['sharp']['gbps']:5.0f}) "
              f"{row['sizes']}  table {row['sharp_table']['us']:6.1f}{best}  errors {row['sharp_vs_bnb']:.1e} "
              f"{row['sharp_vs_exact']:.1e} {row['bnb_vs_exact']:.1e} {row['table_vs_bnb']:.1e}"
              + ("" if row["all_written"] else "  NOT ALL WRITTEN"))
    for kind in ("bnb", "sharp") + (("best",) if args.sweep else ()):
        layer_us = sum(row[kind]["us"] for row in rows.values())
        print(f"{kind:5s}: one layer {layer_us:7.1f} us, x {layers} layers {layer_us * layers / 1e3:.2f} ms")
    step = bench_step(layer_shapes, layers, dtype, args.rows)
    for kind in ("bnb", "sharp"):
        print(f"whole step, {layers} layers' own weights ({step['gigabytes']:.2f} GB) in one graph: {kind:5s} "
              f"{step[kind]['ms']:.3f} ms ({step[kind]['gbps']:.0f} GB/s, "
              f"{step[kind]['gbps'] / PEAK_GBPS:.0%} of {PEAK_GBPS})")
    worst = max(row["sharp_vs_bnb"] for row in rows.values())
    ok = worst < 1e-2 and all(row["all_written"] for row in rows.values())
    print(f"[{'ok' if ok else 'FAIL'}] sharp's products within {worst:.1e} of bitsandbytes' on every shape")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": args.model,
                                               "dtype": args.dtype, "rows_per_product": args.rows,
                                               "shapes": rows, "step": step}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

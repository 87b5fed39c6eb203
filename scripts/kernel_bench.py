"""One-token products of a text model's weights: sharp's Triton kernels against what they replace.

As a decode step runs them, per weight shape, in GB/s of bytes read. CUDA only.

Default (16-bit weights): cuBLAS (F.linear) against sharp's kernel (sharp_cli/models/gemv.py); then
one layer's seven products in a row and the step's estimate: every layer plus the lm_head.

--nf4 (4-bit weights, random, quantized by bitsandbytes itself: nf4 with double quantization, what
`--quant nf4` loads): bitsandbytes' own product (matmul_4bit, what Linear4bit runs) against sharp's
kernel (sharp_cli/models/gemv_nf4.py). For each shape both products against the float64 product of
bitsandbytes' dequantized weight and against each other (||a - b|| / ||b||, printed; the exit code
is 1 when they part by 1e-2 or more); then a whole step: every layer's seven products in order, each
layer its own weights (3.4 GB for a 7B model), in one graph. Bytes: packed weights + absmax (+ the
nested absmax) + x + y + bias; GB/s against the ~4,300 an H200 copies. The block sizes are a fixed
table; --sweep times 36 others.

--fused (the one-token step's glue, models/fused_step.py): one decoder layer of the model's text
model (random weights, norm weights drawn around 1, sharp's gemv products) for one token,
transformers' modules against the fused kernels swapped in, and each piece alone (RMSNorm, rotary
on q and k, SiLU(gate) * up); then
the differences: rotary must equal transformers' exactly, RMSNorm and SiLU * up lie within two bf16
steps of each value (2^-6: both round twice, and float32 exp and sqrt may differ in the last
place), the layer within 1e-2 (||a - b|| / ||b||), alone (timed) and over a cache of 64 earlier
tokens (where q, k and so the rotary embedding matter: alone a token attends only to itself); the
exit code is 1 otherwise.

Every call is timed inside a CUDA graph (as the decode step runs), cycling through enough copies of
each weight that none is served from L2 (a decode step reads each weight once).

    python -m scripts.kernel_bench [--model Qwen/Qwen2.5-VL-7B-Instruct] [--sweep] [--json out.json]
    python -m scripts.kernel_bench --nf4 [--rows 1] [--sweep] [--json out.json]
    python -m scripts.kernel_bench --fused [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

from sharp_cli.models import fused_step, gemv, gemv_nf4

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
    """cuBLAS and sharp's bf16/fp16 kernel on one (n, k) weight, and with sweep every block size."""
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
    weights.clear()  # the copies go before the next shape is made
    torch.cuda.empty_cache()
    return row


PEAK_GBPS = 4300  # what an H200 copies (docs/benchmarks.md)
NF4_SWEEP = [(bn, nb, w) for bn, nb, w in itertools.product((4, 8, 16, 32), (8, 16, 32), (2, 4, 8))]


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

    # As Linear4bit calls it (`self.weight.t()`; its one-row path transposes it back).
    return {"bnb": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias),
            "sharp": lambda: gemv_nf4.gemv_4bit(x, packed, state, bias, sizes=sizes, shuffle=shuffle)}


def _steps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a's and b's values in representable steps of their dtype."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return int((a.contiguous().view(ints).long() - b.contiguous().view(ints).long()).abs().max()) if a.numel() else 0


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(n: int, k: int, bias: bool, dtype, rows: int) -> dict:
    """Errors of both products against bitsandbytes' dequantized weight in float64, and of the
    kernel (shuffle and table lookups) against bitsandbytes' product."""
    import bitsandbytes.functional as F

    packed, state, b = quantized(n, k, bias, dtype, seed=0)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    exact = x.double() @ F.dequantize_4bit(packed, state).double().T + (b.double() if bias else 0)
    calls = products(x, packed, state, b)  # by name: unpacking its values once swapped the two
    ours, theirs = calls["sharp"](), calls["bnb"]()
    table = gemv_nf4.gemv_4bit(x, packed, state, b, shuffle=False)
    poisoned = torch.full_like(ours, float("nan"))
    gemv_nf4.gemv_4bit(x, packed, state, b, out=poisoned)
    return {"sharp_vs_bnb": relative(ours, theirs), "sharp_vs_exact": relative(ours, exact),
            "bnb_vs_exact": relative(theirs, exact), "table_vs_bnb": relative(table, theirs),
            "all_written": not poisoned.isnan().any().item()}


def bench_nf4_shape(n: int, k: int, bias: bool, dtype, rows: int, sweep: bool) -> dict:
    """bitsandbytes' and sharp's 4-bit products on one (n, k) weight: errors, then times."""
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
        for sizes in NF4_SWEEP:
            try:
                tried[sizes] = time_it("sharp", sizes=sizes)["us"]
            except Exception as exc:  # noqa: BLE001 - a size Triton cannot build (registers): skip it
                print(f"  {n}x{k} {sizes}: {type(exc).__name__}", file=sys.stderr)
        best = min(tried, key=tried.get)
        row["best"] = {"us": tried[best], "gbps": one / tried[best] * 1e6 / 1e9, "sizes": list(best)}
        row["sweep"] = {",".join(map(str, s)): us for s, us in tried.items()}
    copies_state.clear()
    torch.cuda.empty_cache()
    return row


def bench_nf4_step(model_shapes: dict, layers: int, dtype, rows: int) -> dict:
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
    weights.clear()  # the copies go before the next shape is made
    torch.cuda.empty_cache()
    return result


def run_bf16(args, config, dtype) -> None:
    """cuBLAS against sharp's kernel on every product of a decode step, 16-bit weights."""
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


def run_nf4(args, config, dtype) -> int:
    """bitsandbytes' 4-bit products against sharp's kernel; the exit code says whether they agree."""
    layer_shapes = {name: s for name, s in shapes(config).items() if name != "lm_head"}  # lm_head stays bf16
    layers = getattr(config, "text_config", config).num_hidden_layers
    rows = {name: bench_nf4_shape(n, k, b, dtype, args.rows, args.sweep) for name, (n, k, b) in layer_shapes.items()}
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
    step = bench_nf4_step(layer_shapes, layers, dtype, args.rows)
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
    return 0 if ok else 1


def fused_pieces(text, hidden, cos_sin, fused: bool) -> dict:
    """name -> callable of the layer's step and of each glue piece, transformers' or the kernels."""
    layer = text.layers[0]
    attention = layer.self_attn
    heads, kv_heads = text.config.num_attention_heads, text.config.num_key_value_heads
    d = attention.head_dim
    q = torch.randn(1, 1, heads, d, device="cuda", dtype=hidden.dtype).transpose(1, 2)
    k = torch.randn(1, 1, kv_heads, d, device="cuda", dtype=hidden.dtype).transpose(1, 2)
    inter = text.config.intermediate_size
    gate, up = (torch.randn(1, 1, inter, device="cuda", dtype=hidden.dtype) for _ in range(2))
    stock_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    stock_rotary = getattr(stock_rotary, "sharp_original", stock_rotary)  # under fused_step's dispatcher
    return {"layer": lambda: layer(hidden, position_embeddings=cos_sin),
            "rms_norm": lambda: layer.input_layernorm(hidden),
            "rotary": (lambda: fused_step.rotary(q, k, *cos_sin)) if fused else
            (lambda: stock_rotary(q, k, *cos_sin)),
            "silu_mul": (lambda: fused_step.silu_mul(gate, up)) if fused else
            (lambda: torch.nn.functional.silu(gate) * up)}


def layer_over_cache(text, hidden, cos_sin, earlier: int = 64):
    """The first layer's one-token output over a cache of `earlier` tokens (prefilled by the stock
    code, the same tokens each call). Alone a token attends only to itself, so the output would not
    depend on q and k, nor on their rotary embedding; over a cache it does."""
    from transformers import DynamicCache

    from sharp_cli.compat import cache_kwargs

    cache = DynamicCache(config=text.config)
    early = torch.randn(1, earlier, hidden.shape[-1], device="cuda", dtype=hidden.dtype,
                        generator=torch.Generator("cuda").manual_seed(2))
    positions = torch.arange(1000 - earlier, 1000, device="cuda").unsqueeze(0)
    layer = text.layers[0]
    layer(early, position_embeddings=text.rotary_emb(early, positions), use_cache=True, **cache_kwargs(layer, cache))
    return layer(hidden, position_embeddings=cos_sin, use_cache=True, **cache_kwargs(layer, cache))


def run_fused(args, config, dtype) -> int:
    """transformers' one-token glue against sharp's fused kernels, timed and compared."""
    from transformers import AutoModel

    text_config = copy.deepcopy(getattr(config, "text_config", config))
    layers, text_config.num_hidden_layers = text_config.num_hidden_layers, 1
    text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        text = AutoModel.from_config(text_config, dtype=dtype).eval()
        for name, param in text.named_parameters():  # norm weights as trained ones are, not all ones:
            if "norm" in name:  # else the check is blind to the rounding before the weight's product
                param.data.normal_(1.0, 0.25)
    gemv.use_gemv([text])
    hidden = torch.randn(1, 1, text_config.hidden_size, device="cuda", dtype=dtype)
    cos_sin = text.rotary_emb(hidden, torch.full((1, 1), 1000, device="cuda"))
    results, outputs = {}, {}
    with torch.inference_mode():
        for kind in ("stock", "fused"):
            if kind == "fused":
                swapped = fused_step.use_fused_step(text)
            torch.manual_seed(1)  # the same q, k, gate, up for both
            pieces = fused_pieces(text, hidden, cos_sin, fused=kind == "fused")
            outputs[kind] = {name: fn() for name, fn in pieces.items()}
            results[kind] = {name: timed(lambda _: fn(), layers) * 1e6 for name, fn in pieces.items()}
            outputs[kind]["layer over a cache"] = layer_over_cache(text, hidden, cos_sin)
    print(f"{torch.cuda.get_device_name()}, {args.model}, {args.dtype}: one token, median us a call "
          f"(graphs of {layers} calls); {swapped} modules of the layer swapped")
    ok = True
    for name in outputs["stock"]:
        stock, ours = outputs["stock"][name], outputs["fused"][name]
        if name == "rotary":  # (q, k) each
            differ = sum((a != b).sum().item() for a, b in zip(stock, ours))
            # How far apart, in steps of the dtype (one step: a rounding difference, e.g. an FMA or a
            # rounding mode; many: another formula or a layout error), and in which half of the head.
            steps = max(_steps_apart(a, b) for a, b in zip(stock, ours))
            halves = [int((a != b)[..., i * a.shape[-1] // 2:(i + 1) * a.shape[-1] // 2].sum()) for a, b in
                      zip(stock, ours) for i in (0, 1)]
            good, verdict = differ == 0, f"{differ} values differ (at most {steps} steps; q/k halves {halves})"
        elif name.startswith("layer"):
            error = relative(ours, stock)
            good, verdict = error < 1e-2, f"||a - b|| / ||b|| {error:.1e}"
        else:
            worst = ((ours.double() - stock.double()).abs() / (stock.double().abs() + 1e-6)).max().item()
            good, verdict = worst <= 2 ** -6, f"worst relative difference {worst:.1e}"
        ok &= good
        timing = (f"stock {results['stock'][name]:7.1f}  fused {results['fused'][name]:7.1f}  x {layers} layers: "
                  f"{(results['stock'][name] - results['fused'][name]) * layers / 1e3:+.3f} ms  "
                  if name in results["stock"] else "")
        print(f"{name:9s} {timing}[{'ok' if good else 'FAIL'}] {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "model": args.model,
                                               "dtype": args.dtype, "layers": layers, "us": results, "ok": ok},
                                              indent=1))
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--nf4", action="store_true", help="4-bit weights: bitsandbytes' product against sharp's")
    parser.add_argument("--fused", action="store_true", help="the step's norm/rotary/activation glue, stock vs fused")
    parser.add_argument("--rows", type=int, default=1, help="--nf4: tokens a product (1: decode)")
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes, report the best")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("scripts.kernel_bench needs a CUDA GPU")

    from sharp_cli.loading import model_config

    config = model_config(args.model, random_weights=True)
    dtype = getattr(torch, args.dtype)
    if args.nf4:
        return run_nf4(args, config, dtype)
    if args.fused:
        return run_fused(args, config, dtype)
    run_bf16(args, config, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

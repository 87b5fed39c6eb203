"""Where each millisecond of a decode step goes (random weights, the real architecture).

    python scripts/profile_decode.py [--model Qwen/Qwen2.5-VL-7B-Instruct] [--quant none|nf4] [--frames 32] [--compile]

For each method: the graph-replayed step time (median of 50 replays, CUDA events), the bytes a
step must read (weights of the text model and lm_head, plus the KV rows) and the bandwidth that
gives, the lm_head alone, and the GPU kernel time of one eager step split by kind (torch.profiler).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from sharp_cli import engine, loading
from sharp_cli.bench import synthetic_clip
from sharp_cli.decode import _capture, _Step
from sharp_cli.prune import PruneConfig
from sharp_cli.sampling import rules_for

KINDS = (("attention", ("fmha", "attention", "flash", "softmax")),
         ("4-bit matmul", ("4bit", "dequant", "kgemm", "gemv_4")),
         ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")),
         ("norm/rope/elementwise", ("elementwise", "vectorized", "reduce", "norm", "copy", "cat", "index", "fill")))


def weight_bytes(loaded) -> int:
    text = loaded.adapter.text_model(loaded.model)
    head = loaded.adapter.lm_head(loaded.model)
    seen, total = set(), 0
    for module in (text, head):
        for p in list(module.parameters()) + list(module.buffers()):
            if id(p) not in seen and p.dtype != torch.bool:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total - text.embed_tokens.weight.numel() * text.embed_tokens.weight.element_size()  # one row read


def timed(fn, n=50) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernel_split(fn, kinds=KINDS) -> tuple[dict, list]:
    """GPU kernel time of one call of fn, by kind (the first of `kinds` whose words a kernel's name
    holds), and the ten costliest kernels as (ms, count, name). profile_vision.py uses it too; on a
    machine without CUDA it splits CPU operator time instead (for trying the scripts out)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    split: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        us = (getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)) if cuda \
            else event.self_cpu_time_total
        if not us or (cuda and event.key.startswith(("aten::", "cuda"))):
            continue
        name = event.key.lower()
        kind = next((k for k, words in kinds if any(w in name for w in words)), "other")
        split[kind] = split.get(kind, 0.0) + us / 1000.0
        kernels.append((us / 1000.0, event.count, event.key[:110]))
    return split, sorted(kernels, reverse=True)[:10]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--methods", default="none,sharp")
    ap.add_argument("--compile", action="store_true", help="each method also with the decode step compiled")
    args = ap.parse_args()
    loaded = loading.load(args.model, device="cuda", quant=args.quant, random_weights=True)
    clip = synthetic_clip(args.frames, 392, 784)
    inputs = engine.prepare(loaded, clip, "What happens in this video?")
    encoded, _ = engine.encode(loaded, inputs)
    weights = weight_bytes(loaded)
    rules = rules_for(loaded.model, loaded.processor.tokenizer)
    head = loaded.adapter.lm_head(loaded.model)
    hidden = torch.randn(1, head.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        head_ms = timed(lambda: head(hidden))
    print(f"{args.model} {args.quant} on {torch.cuda.get_device_name()}: text weights + lm_head read per step "
          f"{weights / 1e9:.2f} GB; lm_head alone {head_ms:.2f} ms")
    for method, compiled in itertools.product(args.methods.split(","), (False, True) if args.compile else (False,)):
        cfg = loaded.adapter.validate_prune(PruneConfig(method=method, ratio=0.15), loaded.num_layers)
        loaded.use_compile(compiled)
        with torch.inference_mode():
            state = engine.prefill(loaded, encoded, cfg, new_tokens=256)
            step = _Step(loaded, state.cache, rules, encoded.next_position)
            step.start(state.logits, inputs["input_ids"], encoded.next_position)
            started = time.perf_counter()
            step()  # compiles, when compiled
            torch.cuda.synchronize()
            first_s = time.perf_counter() - started
            split, _ = kernel_split(step)
            eager_ms = timed(step, 10)
            graph, capture = _capture(step)
            graph_ms = timed(graph.replay) if graph is not None else float("nan")
        kv = state.cache.bytes_used(steps=int(state.cache.step))
        total = weights + kv
        method = f"{method}, compiled (first step {first_s:.1f} s)" if compiled else method
        print(f"  {method}: graph step {graph_ms:.2f} ms ({1000 / graph_ms:.0f} tok/s), eager step {eager_ms:.2f} ms, "
              f"capture {capture if graph is None else f'{capture * 1000:.0f} ms'}; reads {total / 1e9:.2f} GB "
              f"(KV {kv / 1e6:.0f} MB) = {total / graph_ms / 1e6:.0f} GB/s")
        print("    eager step kernel time: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                                    sorted(split.items(), key=lambda kv_: -kv_[1])))


if __name__ == "__main__":
    main()

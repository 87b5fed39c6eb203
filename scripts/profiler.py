"""Where the time goes, on the real architecture with random weights: one profiler per phase.

    python -m scripts.profiler decode [-m Qwen/Qwen2.5-VL-7B-Instruct] [--quant none|nf4] [--frames 32]
                                      [--methods none,sharp] [--compile]
    python -m scripts.profiler vision [-m ...] [--frames 32] [--compile]
    python -m scripts.profiler questions [-m ...] [--frames 32] [--size 448] [--max-tokens 32] [--slow 0.6]

decode: for each method, the graph-replayed step time (median of 50 replays, CUDA events), the bytes
a step must read (weights of the text model and lm_head, plus the KV rows) and the bandwidth that
gives, the lm_head alone, and the GPU kernel time of one eager step split by kind (torch.profiler);
with --compile each method also with the step compiled.

vision: the encoder's time (median of 5 after a warm-up, synchronised clock) with sharp's packed
attention (on CUDA also replayed from a CUDA graph, models/vision_graphs.py) and with transformers'
per-window loop, the FLOPs of its matrix products and the rate that
gives, the GPU kernel time split by kind with the ten costliest kernels, and, with --compile, the
same with the tower's blocks compiled (first call = compile time).

questions: serve_bench's 20 questions (4 about each of 5 clips) answered in one process the way
`sharp serve` answers them (answer.ask with a VideoCache), each under cProfile: each question's wall
time and phases, and for the slow ones the functions that took it (device time shows up at the call
that waits for the GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sharp_cli import answer, engine, loading, measure
from sharp_cli.bench import synthetic_clip
from sharp_cli.decode import Step, capture_step
from sharp_cli.models import fused_vision
from sharp_cli.prune import PruneConfig
from sharp_cli.sampling import rules_for
from sharp_cli.video_cache import VideoCache

DECODE_KINDS = (("attention", ("fmha", "attention", "flash", "softmax")),
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


def timed_events(fn, n=50) -> float:
    """Median ms of n calls, CUDA events."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernel_split(fn, kinds=DECODE_KINDS) -> tuple[dict, list]:
    """GPU kernel time of one call of fn, by kind (the first of `kinds` whose words a kernel's name
    holds), and the ten costliest kernels as (ms, count, name). On a machine without CUDA it splits
    CPU operator time instead (for trying the script out)."""
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


VISION_KINDS = (("attention", ("fmha", "attention", "flash", "softmax")),
         ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")),
         ("elementwise", ("elementwise", "vectorized", "reduce", "norm", "copy", "cat", "index", "fill", "triton")))


def timed_wall(fn, n=5) -> float:
    """Median ms of n calls after one warm-up, synchronised wall clock."""
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
    ms = timed_wall(fn)
    split, top = kernel_split(fn, VISION_KINDS)
    print(f"  {label}: {ms:.1f} ms; matmul FLOPs {flops / 1e12:.1f} T = {flops / ms / 1e9:.0f} TFLOP/s overall")
    print("    kernel time: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    for t, count, name in top:
        print(f"    {t:8.2f} ms  x{count:<5d} {name}")


def profile_decode(args) -> None:
    """Per method: the graph-replayed step, the bytes it reads, the eager step's kernels by kind."""
    loaded = loading.load(args.model, device="cuda", quant=args.quant, random_weights=True)
    clip = synthetic_clip(args.frames, 392, 784)
    weights = weight_bytes(loaded)
    rules = rules_for(loaded.model, loaded.processor.tokenizer)
    head = loaded.adapter.lm_head(loaded.model)
    hidden = torch.randn(1, head.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        head_ms = timed_events(lambda: head(hidden))
    print(f"{args.model} {args.quant} on {torch.cuda.get_device_name()}: text weights + lm_head read per step "
          f"{weights / 1e9:.2f} GB; lm_head alone {head_ms:.2f} ms")
    for method, compiled in itertools.product(args.methods.split(","), (False, True) if args.compile else (False,)):
        cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=0.15))
        loaded.use_compile(compiled)
        with torch.inference_mode():
            done = answer.run(loaded, clip, "What happens in this video?", cfg, 0, room=256)  # prefill only
            state, encoded = done.prefill, done.encoded
            step = Step(loaded, state.cache, rules, encoded.next_position)
            step.start(state.logits, done.prompt_ids, encoded.next_position)
            started = time.perf_counter()
            step()  # compiles, when compiled
            torch.cuda.synchronize()
            first_s = time.perf_counter() - started
            split, _ = kernel_split(step)
            eager_ms = timed_events(step, 10)
            graph, capture = capture_step(step)
            graph_ms = timed_events(graph.replay) if graph is not None else float("nan")
        kv = state.cache.bytes_used(steps=int(state.cache.step))
        total = weights + kv
        method = f"{method}, compiled (first step {first_s:.1f} s)" if compiled else method
        print(f"  {method}: graph step {graph_ms:.2f} ms ({1000 / graph_ms:.0f} tok/s), eager step {eager_ms:.2f} ms, "
              f"capture {capture if graph is None else f'{capture * 1000:.0f} ms'}; reads {total / 1e9:.2f} GB "
              f"(KV {kv / 1e6:.0f} MB) = {total / graph_ms / 1e6:.0f} GB/s")
        print("    eager step kernel time: " + ", ".join(f"{k} {v:.2f} ms" for k, v in
                                                    sorted(split.items(), key=lambda kv_: -kv_[1])))



def profile_vision(args) -> None:
    """The encoder with sharp's packed attention and with transformers' loop; compiled blocks."""
    loaded = loading.load(args.model, device="auto", quant="none", random_weights=args.model != "sharp-tiny")
    clip = synthetic_clip(args.frames, 392, 784)
    inputs = engine.prepare(loaded, clip, "What happens in this video?")
    visual = loaded.model.model.visual
    patches = int(inputs["pixel_values_videos"].shape[0])
    flops = matmul_flops(visual, patches)
    dtypes = sorted({str(p.dtype) for p in visual.parameters()})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.model} vision tower on {device}: {patches} patches, "
          f"pixel_values {inputs['pixel_values_videos'].dtype}, weights {dtypes}, "
          f"attention {visual.config._attn_implementation}, tf32 {torch.backends.cuda.matmul.allow_tf32}")

    def run():
        with torch.inference_mode():
            loaded.adapter.vision(loaded.model, inputs)

    kernels = "on" if fused_vision.available(loaded.device) else "off"
    report(f"sharp's default: packed attention, fused vision kernels {kernels}", run, flops)
    if torch.cuda.is_available():  # SHARP_VISION_GRAPHS=1's path: the tower replayed from a graph per shape
        from sharp_cli.models.vision_graphs import VisionGraphs

        graphs = loaded.vision_graphs or VisionGraphs(visual)

        def run_graphed():
            with graphs.active():
                run()

        report("the same, replayed from a CUDA graph per shape", run_graphed, flops)
        print(f"    graphs: {graphs.counts}{', failed: ' + str(graphs.failed) if graphs.failed else ''}")
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



def profile_questions(args) -> None:
    """serve_bench's questions answered as `sharp serve` answers them, each under cProfile."""
    from scripts.serve_bench import make_questions

    started = time.perf_counter()
    loaded = loading.load(args.model, device="auto", quant=args.quant, random_weights=args.model != "sharp-tiny")
    print(f"load {time.perf_counter() - started:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="sharp-profile-"))
    questions = make_questions(work, args)
    cache = VideoCache(8 * 2**30)
    cfg = loaded.resolve_prune(PruneConfig(method=args.method))
    total = 0.0
    for q in questions:
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        clip = cache.load_video(str(work / "videos" / q["video"]), frames=args.frames)
        result = answer.ask(loaded, clip, q["question"], cfg, max_new_tokens=args.max_tokens, cache=cache)
        measure.synchronize(loaded.device)
        profile.disable()
        wall = time.perf_counter() - t0
        total += wall
        d = result.decoded
        graphs = loaded.graphs
        print(f"{q['key']:18s} wall {wall:6.3f} s: vision {result.vision_seconds:.3f}, prefill "
              f"{result.prefill.seconds:.3f}, decode {d.seconds:.3f} ({d.mode}, capture {d.capture_seconds:.3f}), "
              f"{len(d.tokens)} tokens, seq {result.encoded.layout.seq_len}, tail graphs "
              f"{len(graphs) if graphs is not None else '-'}, cache {result.extra.get('cache')}")
        if wall > args.slow:
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
            stats.print_stats(12)
            print("\n".join("    " + line for line in out.getvalue().splitlines()[6:] if line.strip()))
    print(f"{len(questions)} questions: {total:.2f} s")



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    phases = ap.add_subparsers(dest="phase", required=True)
    for name in ("decode", "vision", "questions"):
        p = phases.add_parser(name)
        p.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
        p.add_argument("--frames", type=int, default=32)
        if name != "vision":
            p.add_argument("--quant", default="none")
        if name != "questions":
            p.add_argument("--compile", action="store_true", help="also with the blocks or the step compiled")
    phases.choices["decode"].add_argument("--methods", default="none,sharp")
    questions = phases.choices["questions"]
    questions.add_argument("--size", type=int, default=448)
    questions.add_argument("--max-tokens", type=int, default=32)
    questions.add_argument("--slow", type=float, default=0.6,
                           help="seconds above which a question's profile is printed")
    questions.add_argument("--method", default="sharp")
    args = ap.parse_args(argv)
    {"decode": profile_decode, "vision": profile_vision, "questions": profile_questions}[args.phase](args)


if __name__ == "__main__":
    main()

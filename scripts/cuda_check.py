"""CUDA-only checks that CPU CI cannot run. Prints one line per check, exits non-zero if any fails.

    python scripts/cuda_check.py [--model Qwen/Qwen2.5-VL-7B-Instruct] [--frames 8] [--quant none|nf4|int8]
                                 [--dtype auto|float16]

1. decode: graph-replayed steps give the eager steps' tokens (pruned and unpruned);
2. unpruned decode gives transformers' generate(do_sample=False) tokens (with the checkpoint's
   repetition penalty), or says where they part and by how much the logits differ there;
3. the prefill tail's CUDA graph leaves exactly the eager tail's KV rows in the cache;
4. many questions of different lengths keep the number of caches, graphs and the allocated
   memory bounded;
5. quantized loading keeps the vision tower and lm_head unquantized.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from sharp_cli import engine, loading
from sharp_cli.answer import ask
from sharp_cli.bench import synthetic_clip
from sharp_cli.peers import stock_attention
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore

QUESTION = "What happens in this video?"
results: list[bool] = []


def report(ok: bool, text: str) -> None:
    results.append(ok)
    print(f"[{'ok' if ok else 'FAIL'}] {text}", flush=True)


def graph_vs_eager(loaded, clip, cfg, tokens: int) -> None:
    store = PriorStore(use_disk=False)
    loaded.use_cuda_graphs(False)
    eager = ask(loaded, clip, QUESTION, cfg, max_new_tokens=tokens, store=store)
    loaded.use_cuda_graphs(True)
    ask(loaded, clip, QUESTION, cfg, max_new_tokens=tokens, store=store)  # captures
    graphed = ask(loaded, clip, QUESTION, cfg, max_new_tokens=tokens, store=store)  # replays
    same = eager.tokens == graphed.tokens
    report(same and graphed.decoded.mode == "cuda graph",
           f"{cfg.method}: graph decode ({graphed.decoded.mode}, {graphed.decoded.tokens_per_second or 0:.0f} tok/s) "
           f"== eager decode ({eager.decoded.tokens_per_second or 0:.0f} tok/s): {same}"
           + (f"; note: {graphed.decoded.note}" if graphed.decoded.note else ""))


def equals_generate(loaded, clip, tokens: int) -> None:
    cfg = PruneConfig(method="none")
    ours = ask(loaded, clip, QUESTION, cfg, max_new_tokens=tokens, store=PriorStore(use_disk=False))
    inputs = engine.prepare(loaded, clip, QUESTION)
    with stock_attention(loaded), torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=tokens)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    n = min(len(ref), len(ours.tokens))
    first_diff = next((i for i in range(n) if ref[i] != ours.tokens[i]), None)
    penalty = loaded.model.generation_config.repetition_penalty
    report(first_diff is None and len(ref) == len(ours.tokens),
           f"none: tokens == generate(do_sample=False) (repetition_penalty {penalty}): "
           + ("all equal" if first_diff is None else f"equal up to token {first_diff} of {n}")
           + f"; ours {ours.tokens[:6]}..., generate {ref[:6]}...")


def tail_kv_exact(loaded, clip, cfg) -> None:
    inputs = engine.prepare(loaded, clip, QUESTION)
    encoded, _ = engine.encode(loaded, inputs)

    def rows(state):
        return [(layer.length, layer.keys[:, :, :layer.length].clone(), layer.values[:, :, :layer.length].clone(),
                 int(layer.valid.sum())) for layer in state.cache.layers]

    loaded.use_cuda_graphs(False)
    eager = rows(engine.prefill(loaded, encoded, cfg))
    loaded.use_cuda_graphs(True)
    for _ in range(2):  # seen once: eager; twice: captured
        engine.prefill(loaded, encoded, cfg)
    replays = loaded.graphs.replays if loaded.graphs else 0
    state = engine.prefill(loaded, encoded, cfg)
    graphed = rows(state)
    same_len = [a[0] for a in eager] == [b[0] for b in graphed] and all(b[3] == b[0] for b in graphed)
    worst = max(((a[1].float() - b[1].float()).abs().max().item() for a, b in zip(eager, graphed)), default=0.0)
    replayed = loaded.graphs is not None and loaded.graphs.replays > replays
    report(same_len and replayed and worst < 5e-2,
           f"{cfg.method}: prefill tail graph KV rows == eager rows (lengths equal {same_len}, "
           f"max |diff| {worst:.2e}, replayed {replayed})")


def bounded(loaded, cfg) -> None:
    sizes, pools = [], []
    for frames in (4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 4, 8, 16):
        clip = synthetic_clip(frames, 392, 784, seed=frames)
        ask(loaded, clip, QUESTION, replace(cfg), max_new_tokens=16, store=PriorStore(use_disk=False))
        cuda = loaded.device.type == "cuda"
        sizes.append(torch.cuda.memory_allocated() if cuda else 0)
        pools.append((len(loaded.kv_pool), loaded.kv_pool.graph_count(), len(loaded.graphs) if loaded.graphs else 0))
    pool = loaded.kv_pool
    max_tails = loaded.graphs.max_graphs if loaded.graphs else 0
    ok = all(c <= pool.max_caches and t <= max_tails for c, _, t in pools)
    ok &= sizes[-1] <= max(sizes[:11]) * 1.02  # once the pool is full nothing grows
    report(ok, f"{cfg.method}: 14 questions of 4..24 frames: caches/decode graphs/tail graphs {pools[-1]} "
               f"(max caches {pool.max_caches}), allocated {sizes[0] / 2**30:.2f} -> max {max(sizes) / 2**30:.2f} "
               f"-> last {sizes[-1] / 2**30:.2f} GiB")


def quantized_parts(loaded) -> None:
    model = loaded.model
    vision = tuple(p for p in loaded.adapter.skip_modules() if p != "lm_head")
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith(vision)}
    head = type(model.lm_head).__name__
    ok = not any("4bit" in k or "8bit" in k for k in kinds) and "bit" not in head.lower()
    report(ok, f"{loaded.quant}: vision tower and lm_head unquantized (lm_head {head})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--quant", default="none")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code (graph checks then fail)")
    parser.add_argument("--skip", default="", help="comma list of checks to skip: graphs,generate,kv,bounded")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    loaded = loading.load(args.model, device=args.device, quant=args.quant, dtype=args.dtype, random_weights=True)
    gpu = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
    print(f"{args.model} {args.quant}/{loaded.dtype} on {gpu}", flush=True)
    clip = synthetic_clip(args.frames, 392, 784)
    layer = max(2, loaded.adapter.min_layer)
    sharp = loaded.adapter.validate_prune(PruneConfig(method="sharp", ratio=0.15, layer=layer), loaded.num_layers)
    if "graphs" not in skip:
        graph_vs_eager(loaded, clip, sharp, args.tokens)
        graph_vs_eager(loaded, clip, PruneConfig(method="none"), args.tokens)
    if "generate" not in skip:
        equals_generate(loaded, clip, args.tokens)
    if "kv" not in skip:
        tail_kv_exact(loaded, clip, sharp)
    if "bounded" not in skip:
        bounded(loaded, sharp)
    if args.quant != "none":
        quantized_parts(loaded)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

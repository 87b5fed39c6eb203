"""CUDA-only checks that CPU CI cannot run: the CUDA-graph tail equals the eager tail, and
bitsandbytes loading keeps the vision tower and lm_head out of quantization.

    python scripts/cuda_check.py [--model Qwen/Qwen2.5-VL-7B-Instruct] [--frames 32]
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from sharp_cli import engine, loading
from sharp_cli.decode import decode
from sharp_cli.prior_pass import positional_prior
from sharp_cli.bench import synthetic_clip
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore


def compare_graphs(loaded, clip, cfg, label):
    inputs = engine.prepare(loaded, clip, "What happens in this video?")
    encoded, _ = engine.encode(loaded, inputs)
    prior = positional_prior(loaded, clip, encoded, cfg, PriorStore(use_disk=False))
    loaded.use_cuda_graphs(False)
    eager = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
    eager_tokens, _ = decode(loaded, encoded, eager, 8)
    loaded.use_cuda_graphs(True)
    for _ in range(3):  # first sighting runs eagerly, second captures, third replays
        graphed = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
    graph_tokens, _ = decode(loaded, encoded, graphed, 8)
    replays = loaded.graphs.replays
    a, b = eager.logits.float(), graphed.logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    same_kept = torch.equal(eager.kept, graphed.kept)
    ok = same_kept and rel < 2e-2 and replays >= 2 and eager_tokens[:4] == graph_tokens[:4]
    print(f"[{'ok' if ok else 'FAIL'}] {label}: graph vs eager logits rel.err {rel:.2e}, kept identical "
          f"{same_kept}, replays {replays}, tokens eager {eager_tokens[:4]} graph {graph_tokens[:4]}"
          + (f", capture error: {loaded.graphs.last_error}" if loaded.graphs.last_error else ""))
    return ok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--quant", default="none")
    args = parser.parse_args()
    loaded = loading.load(args.model, device="cuda", quant=args.quant, random_weights=True)
    clip = synthetic_clip(args.frames, 392, 784)
    results = []
    for method in ("fastv", "sharp", "random"):
        layer = max(2, loaded.adapter.min_layer)  # Qwen3-VL: 3 (DeepStack)
        cfg = loaded.adapter.validate_prune(PruneConfig(method=method, ratio=0.15, layer=layer), loaded.num_layers)
        results.append(compare_graphs(loaded, clip, cfg, f"{args.quant} {method} 0.15"))
    if args.quant != "none":
        model = loaded.model
        vision = tuple(p for p in loaded.adapter.skip_modules() if p != "lm_head")
        kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith(vision)}
        head = type(model.lm_head).__name__
        ok = not any("4bit" in k or "8bit" in k for k in kinds) and "bit" not in head.lower()
        print(f"[{'ok' if ok else 'FAIL'}] {args.quant}: vision tower and lm_head kept unquantized "
              f"(lm_head {head}; visual module kinds {sorted(kinds)[:4]}...)")
        results.append(ok)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

"""Markdown tables for docs/benchmarks.md from `sharp bench --output-json` files.

    python scripts/bench_table.py docs/results/h100-*.json

Recomputes the causal-aware FLOPs limit from each file's own token counts when the file predates
that column, with the model's shipped config.
"""

from __future__ import annotations

import json
import sys

from sharp_cli import measure
from sharp_cli.models.random_init import load_config


def rows(path: str):
    data = json.load(open(path))
    name = data["model"].split("random-models/")[-1].replace("--", "/")
    dims = measure.text_dims(load_config(name))
    base = next(r for r in data["rows"] if r["method"] == "none")
    for r in data["rows"]:
        seq, kept, k = base["sequence_tokens"], r["tokens_after_pruning"], r["layer"] or 2
        causal_base = measure.prefill_flops(dims, seq, seq, k, measure.causal_layer_flops)
        causal = measure.prefill_flops(dims, seq, kept, k, measure.causal_layer_flops)
        limit_c = causal_base / causal
        yield data, name, r, limit_c


def main(paths):
    for path in paths:
        first = True
        for data, name, r, limit_c in rows(path):
            if first:
                print(f"\n**{name}**, {data['quant']}/{data['dtype']}, {data['frames']} frames "
                      f"{data['frame_size'][0]}x{data['frame_size'][1]}, K={data['layer']}, "
                      f"{'CUDA graphs' if data['cuda_graphs'] else 'no CUDA graphs'}, median of {data['iters']} "
                      f"after {data['warmup']} warm-up, {data['gpu']} (`{path}`)\n")
                print("| method | ratio | visual kept | LLM prefill | speed-up | FLOPs limit | efficiency | "
                      "causal limit | eff. vs causal | selection | TTFT | KV cache | peak mem |")
                print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
                first = False
            print(f"| {r['method']} | {r['ratio']:.2f} | {r['visual_tokens_kept']:,}/{r['visual_tokens_total']:,} | "
                  f"{r['prefill_seconds'] * 1e3:.1f} ms | {r['speedup']:.2f}x | {r['flops_limit']:.2f}x | "
                  f"{r['efficiency']:.0%} | {limit_c:.2f}x | {r['speedup'] / limit_c:.0%} | "
                  f"{r['selection_seconds'] * 1e3:.2f} ms ({r['selection_share']:.1%}) | "
                  f"{r['ttft_seconds'] * 1e3:.0f} ms | {r['kv_cache_bytes'] / 2**20:.1f} MiB | "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main(sys.argv[1:])

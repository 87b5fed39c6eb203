"""`sharp bench`: every method and ratio on the same inputs, in the same process.

Per row: LLM prefill time (median over --iters after --warmup, device-synchronised), vision
encoder and time to first token, the selection step alone, analytic prefill FLOPs and the
speed-up they allow, the measured speed-up over `none`, efficiency = measured / FLOPs limit,
KV-cache bytes, peak memory and decode tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from sharp_cli import engine, measure
from sharp_cli.decode import decode
from sharp_cli.prior_pass import positional_prior
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.prior import PriorStore


def synthetic_clip(frames: int, height: int, width: int, seed: int = 0):
    """A clip of smooth random content with the given layout (no file needed)."""
    from sharp_cli.video import VideoClip

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (frames, max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    content = coarse.repeat(16, axis=1).repeat(16, axis=2)[:, :height, :width]
    content = np.ascontiguousarray(np.pad(content, ((0, 0), (0, height - content.shape[1]),
                                                    (0, width - content.shape[2]), (0, 0)), mode="edge"))
    return VideoClip(frames=content, fps=2.0, total_frames=frames, indices=list(range(frames)),
                     backend="synthetic", path=f"<synthetic {frames}x{height}x{width}>", notes=[])


def plan_rows(methods: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    rows = []
    if "none" in methods:
        rows.append(("none", 1.0))
    rows += [(m, r) for m in methods if m != "none" for r in ratios]
    return rows


def run(loaded, clip, question: str, base: PruneConfig, methods: list[str], ratios: list[float], *,
        warmup: int = 1, iters: int = 5, decode_tokens: int = 16, max_pixels: int | None = None,
        progress=None) -> dict:
    store = PriorStore(use_disk=False)
    inputs = engine.prepare(loaded, clip, question, max_pixels)
    dims = loaded.dims
    results = []
    for method, ratio in plan_rows(methods, ratios):
        cfg = loaded.adapter.validate_prune(replace(base, method=method, ratio=ratio), loaded.num_layers)
        results.append(_measure_row(loaded, clip, inputs, cfg, store, dims, warmup, iters, decode_tokens,
                                    max_pixels))
        if progress is not None:
            progress()
    _relative_to_unpruned(results)
    return {
        "model": loaded.name, "device": str(loaded.device), "gpu": _gpu(loaded), "quant": loaded.quant,
        "dtype": str(loaded.dtype).replace("torch.", ""), "random_weights": loaded.random_weights,
        "cuda_graphs": loaded.graphs is not None, "frames": len(clip.indices),
        "frame_size": list(clip.frames.shape[1:3]), "layer": base.layer, "warmup": warmup, "iters": iters,
        "rows": results,
    }


def _measure_row(loaded, clip, inputs, cfg, store, dims, warmup, iters, decode_tokens, max_pixels) -> dict:
    prefill_s, vision_s, select_s = [], [], []
    state = encoded = prior = None
    for i in range(warmup + iters):
        measure.reset_peak_memory(loaded.device)
        encoded, vis = engine.encode(loaded, inputs)
        prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
        state = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
        if i >= warmup:
            prefill_s.append(state.seconds)
            vision_s.append(vis)
            select_s.append(state.selection_seconds)
    peak = measure.peak_memory_bytes(loaded.device)
    tokens, dec_s = [0], 0.0
    if decode_tokens > 1:
        decode(loaded, encoded, engine.prefill(loaded, encoded, cfg, prior=prior.prior), 3)  # warm-up
        tokens, dec_s = decode(loaded, encoded, state, decode_tokens)
    layout = encoded.layout
    kept = int(state.kept.numel()) if state.kept is not None else layout.num_visual
    flops = measure.prefill_flops(dims, layout.seq_len, state.kept_len, cfg.layer)
    causal = measure.prefill_flops(dims, layout.seq_len, state.kept_len, cfg.layer, measure.causal_layer_flops)
    prefill, vision = measure.summarize(prefill_s), measure.summarize(vision_s)
    return {
        "method": cfg.method, "ratio": cfg.ratio, "layer": cfg.layer if cfg.prunes else None,
        "visual_tokens_total": layout.num_visual, "visual_tokens_kept": kept,
        "sequence_tokens": layout.seq_len, "tokens_after_pruning": state.kept_len,
        "prefill_seconds": prefill["median"], "prefill_seconds_min": prefill["min"],
        "prefill_seconds_max": prefill["max"], "vision_seconds": vision["median"],
        "ttft_seconds": prefill["median"] + vision["median"],
        "selection_seconds": measure.summarize(select_s)["median"] if cfg.prunes else 0.0,
        "prior_seconds": prior.seconds if prior is not None else 0.0,
        "prefill_flops": flops, "prefill_flops_causal": causal,
        "kv_cache_bytes": state.kv_cache_bytes, "kv_cache_bytes_unpruned": state.kv_cache_bytes_unpruned,
        "peak_memory_bytes": peak,
        "decode_tokens_per_second": (len(tokens) - 1) / dec_s if dec_s > 0 and len(tokens) > 1 else None,
        "options": cfg.as_dict(),
    }


def _relative_to_unpruned(rows: list[dict]) -> None:
    base = next((r for r in rows if r["method"] == "none"), None)
    for row in rows:
        if base is None:
            row.update(speedup=None, flops_limit=None, efficiency=None, ttft_speedup=None, selection_share=None,
                       flops_limit_causal=None, efficiency_causal=None, kv_cache_share=None)
            continue
        row["flops_limit"] = base["prefill_flops"] / row["prefill_flops"]
        row["speedup"] = base["prefill_seconds"] / row["prefill_seconds"]
        row["efficiency"] = row["speedup"] / row["flops_limit"]
        row["flops_limit_causal"] = base["prefill_flops_causal"] / row["prefill_flops_causal"]
        row["efficiency_causal"] = row["speedup"] / row["flops_limit_causal"]
        row["ttft_speedup"] = base["ttft_seconds"] / row["ttft_seconds"]
        row["selection_share"] = row["selection_seconds"] / base["prefill_seconds"]
        row["kv_cache_share"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]


def _gpu(loaded):
    import torch

    return torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None


def table(result: dict):
    from rich.table import Table

    from sharp_cli.report import fmt_bytes

    title = (f"sharp bench: {result['model']}{' (random weights)' if result['random_weights'] else ''} on "
             f"{result['gpu'] or result['device']}, {result['quant']}/{result['dtype']}, "
             f"{result['frames']} frames, K={result['layer']}, median of {result['iters']}"
             f"{', CUDA graphs' if result['cuda_graphs'] else ''}")
    t = Table(title=title, title_justify="left", header_style="bold")
    for col in ("method", "ratio", "kept", "prefill", "speed-up", "FLOPs limit", "efficiency", "select",
                "TTFT", "TFLOPs", "KV cache", "peak mem", "decode tok/s"):
        t.add_column(col, justify="left" if col == "method" else "right")

    def pct(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"

    def times(x):
        return "-" if x is None else f"{x:.2f}x"

    for r in result["rows"]:
        t.add_row(
            r["method"], f"{r['ratio']:.2f}", f"{r['visual_tokens_kept']:,}/{r['visual_tokens_total']:,}",
            f"{r['prefill_seconds'] * 1000:.1f} ms", times(r.get("speedup")), times(r.get("flops_limit")),
            pct(r.get("efficiency")), f"{r['selection_seconds'] * 1000:.2f} ms", f"{r['ttft_seconds'] * 1000:.1f} ms",
            f"{r['prefill_flops'] / 1e12:.2f}", fmt_bytes(r["kv_cache_bytes"]), fmt_bytes(r["peak_memory_bytes"]),
            "-" if r["decode_tokens_per_second"] is None else f"{r['decode_tokens_per_second']:.1f}",
        )
    return t


def plot(result: dict, path: str) -> None:
    from sharp_cli.errors import UsageError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sharp-cli[plot]'") from None
    rows = [r for r in result["rows"] if r["method"] != "none" and r.get("speedup")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["ratio"], r["speedup"], r["kv_cache_share"]) for r in rows if r["method"] == method)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    limit = sorted({(r["ratio"], r["flops_limit"]) for r in rows})
    ax1.plot([p[0] for p in limit], [p[1] for p in limit], "k--", label="FLOPs limit")
    ax1.set(xlabel="ratio of visual tokens kept", ylabel="LLM prefill speed-up", title="speed-up")
    ax2.set(xlabel="ratio of visual tokens kept", ylabel="KV cache / unpruned", title="memory")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

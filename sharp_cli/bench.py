"""`sharp bench`: every method and ratio, and the stock transformers path, on the same inputs in the
same process.

A sharp row (none, fastv, random, sharp) times whole answers: each of --iters runs (after --warmup)
is vision encoder -> positional prior (cached after its first computation, whose cost is reported
as prior_seconds) -> prefill -> --decode-tokens tokens, on the wall clock with the device
synchronised at the end (e2e_seconds), and the same run's phases on device clocks. A peer row
(transformers, transformers-static) times `model.generate()` on the same processor inputs.
Medians are reported, with the spread, so a row too noisy to trust says so.

Per row also: analytic prefill FLOPs and the speed-up they allow, measured prefill speed-up over
`none` and efficiency = measured / FLOPs limit, the selection step alone, KV cache and peak memory,
and agreement with `none` (first-token KL divergence and top-1, the answer's tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from sharp_cli import answer, engine, measure, peers
from sharp_cli.evaluate.agreement import first_token
from sharp_cli.prior_pass import positional_prior
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.prior import PriorStore
from sharp_cli.sampling import rules_for

UNSTEADY = 0.2  # (max - min) / median of a row's end-to-end times above which the row is flagged


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
    rows = [(m, 1.0) for m in peers.PEERS if m in methods]
    if "none" in methods:
        rows.append(("none", 1.0))
    rows += [(m, r) for m in methods if m not in ("none", *peers.PEERS) for r in ratios]
    return rows


def run(loaded, clip, question: str, base: PruneConfig, methods: list[str], ratios: list[float], *,
        warmup: int = 1, iters: int = 5, decode_tokens: int = 64, max_pixels: int | None = None,
        progress=None, extra: dict | None = None) -> dict:
    store = PriorStore(use_disk=False)
    start = time.perf_counter()
    inputs = engine.prepare(loaded, clip, question, max_pixels)
    prepare_s = time.perf_counter() - start
    results = []
    for method, ratio in plan_rows(methods, ratios):
        if method in peers.PEERS:
            row = _peer_row(loaded, inputs, method, warmup, iters, decode_tokens)
        else:
            cfg = loaded.resolve_prune(replace(base, method=method, ratio=ratio))  # each row's config, once
            row = _sharp_row(loaded, clip, inputs, cfg, store, warmup, iters, decode_tokens, max_pixels)
        results.append(row)
        if progress is not None:
            progress()
    _relative(results, rules_for(loaded.model, loaded.processor.tokenizer).eos)
    return {
        "model": loaded.name, "device": str(loaded.device), "gpu": _gpu(loaded), "quant": loaded.quant,
        "dtype": str(loaded.dtype).replace("torch.", ""), "random_weights": loaded.random_weights,
        "cuda_graphs": loaded.graphs is not None, "compile": loaded.compiled, "frames": len(clip.indices),
        "frame_size": list(clip.frames.shape[1:3]), "layer": base.layer, "warmup": warmup, "iters": iters,
        "decode_tokens": decode_tokens, "prepare_seconds": prepare_s, **(extra or {}), "rows": results,
    }


def _sharp_row(loaded, clip, inputs, cfg, store, warmup, iters, decode_tokens, max_pixels) -> dict:
    """warmup + iters passes of answer.run (EOS ignored: every row decodes as many tokens); the
    medians of its phase timings."""
    rules = rules_for(loaded.model, loaded.processor.tokenizer)
    row_start = time.perf_counter()
    encoded, _ = engine.encode(loaded, inputs)
    first_prior = positional_prior(loaded, clip, encoded, cfg, PriorStore(use_disk=False), max_pixels)
    samples = {k: [] for k in ("e2e", "prefill", "vision", "select", "decode", "rate")}
    capture_s = 0.0
    for i in range(warmup + iters):
        done = answer.run(loaded, clip, None, cfg, decode_tokens, inputs=inputs, max_pixels=max_pixels, store=store,
                          rules=rules, ignore_eos=True)
        state, decoded = done.prefill, done.decoded
        capture_s = max(capture_s, decoded.capture_seconds if decoded is not None else 0.0)
        if i == 0:
            first_s = time.perf_counter() - row_start  # with the prior pass, any compile and captures
        if i >= warmup:
            samples["e2e"].append(done.seconds)
            samples["prefill"].append(state.seconds)
            samples["vision"].append(done.vision_seconds)
            samples["select"].append(state.selection_seconds)
            if decoded is not None and decoded.tokens_per_second:
                samples["decode"].append(decoded.seconds)
                samples["rate"].append(decoded.tokens_per_second)
    encoded = done.encoded
    layout = encoded.layout
    dims = loaded.dims
    kept = int(state.kept.numel()) if state.kept is not None else layout.num_visual
    prefill, vision, e2e = (measure.summarize(samples[k]) for k in ("prefill", "vision", "e2e"))
    return {
        "method": cfg.method, "ratio": cfg.ratio, "layer": cfg.layer if cfg.prunes else None,
        "visual_tokens_total": layout.num_visual, "visual_tokens_kept": kept,
        "sequence_tokens": layout.seq_len, "tokens_after_pruning": state.kept_len,
        "prefill_seconds": prefill["median"], "prefill_seconds_min": prefill["min"],
        "prefill_seconds_max": prefill["max"], "vision_seconds": vision["median"],
        "ttft_seconds": prefill["median"] + vision["median"],
        "selection_seconds": measure.summarize(samples["select"])["median"] if cfg.prunes else 0.0,
        "prior_seconds": first_prior.seconds,
        "prefill_flops": measure.prefill_flops(dims, layout.seq_len, state.kept_len, cfg.layer),
        "prefill_flops_causal": measure.prefill_flops(dims, layout.seq_len, state.kept_len, cfg.layer,
                                                      measure.causal_layer_flops),
        "kv_cache_bytes": state.kv_cache_bytes, "kv_cache_bytes_unpruned": state.kv_cache_bytes_unpruned,
        "peak_memory_bytes": measure.peak_memory_bytes(loaded.device),
        "decode_seconds": measure.summarize(samples["decode"])["median"],
        "decode_tokens_per_second": measure.summarize(samples["rate"])["median"],
        "decode_mode": decoded.mode if decoded is not None else None,
        "decode_capture_note": decoded.note if decoded is not None else None,
        "decode_capture_seconds": capture_s,  # the decode step's graph capture, once (in the first run)
        "first_answer_seconds": first_s,
        "e2e_seconds": e2e["median"], "e2e_seconds_min": e2e["min"], "e2e_seconds_max": e2e["max"],
        "tokens": decoded.tokens if decoded is not None else [],
        "first_token_logits": state.logits.reshape(-1).float().cpu(),
        "options": cfg.as_dict(),
    }


def _peer_row(loaded, inputs, peer: str, warmup: int, iters: int, decode_tokens: int) -> dict:
    """model.generate() timed like a sharp row; one failure (a compile error) fails this row only."""
    new = max(1, decode_tokens)
    runs = []
    try:
        for i in range(max(1, warmup) + iters):  # the first static-cache call compiles: never timed
            measure.reset_peak_memory(loaded.device)
            result = peers.generate(loaded, inputs, peer, new)
            if i == 0:
                first_s = result["seconds"]  # transformers-static compiles in it
            if i >= max(1, warmup):
                runs.append(result)
    except Exception as exc:  # noqa: BLE001 - reported in the row, the other rows still run
        from sharp_cli.errors import one_line

        return {"method": peer, "ratio": 1.0, "error": one_line(f"{type(exc).__name__}: {exc}", 300)}
    e2e = measure.summarize([r["seconds"] for r in runs])
    rates = [(new - 1) / (r["seconds"] - r["ttft_seconds"]) for r in runs
             if new > 1 and r["seconds"] > r["ttft_seconds"]]
    return {
        "method": peer, "ratio": 1.0, "layer": None, "sequence_tokens": int(inputs["input_ids"].shape[1]),
        "ttft_seconds": measure.summarize([r["ttft_seconds"] for r in runs])["median"],
        "decode_tokens_per_second": measure.summarize(rates)["median"],
        "e2e_seconds": e2e["median"], "e2e_seconds_min": e2e["min"], "e2e_seconds_max": e2e["max"],
        "peak_memory_bytes": measure.peak_memory_bytes(loaded.device), "tokens": runs[-1]["tokens"],
        "first_answer_seconds": first_s,
        "decode_mode": "generate()" + (", static cache, compiled" if peer == "transformers-static"
                                       and loaded.device.type == "cuda" else ""),
    }


def _relative(rows: list[dict], eos) -> None:
    """Speed-ups, efficiency and agreement against the `none` and `transformers` rows of the run."""
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["method"] == "none"), None)
    stock = {m: next((r for r in ok if r["method"] == m), None) for m in peers.PEERS}
    for row in ok:
        spread = ((row["e2e_seconds_max"] - row["e2e_seconds_min"]) / row["e2e_seconds"]
                  if row.get("e2e_seconds") else None)
        row["e2e_spread"] = spread
        row["steady"] = spread is not None and spread <= UNSTEADY
        for peer, key in (("transformers", "e2e_speedup"), ("transformers-static", "e2e_speedup_static")):
            ref = stock[peer]
            row[key] = ref["e2e_seconds"] / row["e2e_seconds"] if ref and row.get("e2e_seconds") else None
        row.update(speedup=None, flops_limit=None, efficiency=None, flops_limit_causal=None, efficiency_causal=None,
                   ttft_speedup=None, selection_share=None, kv_cache_share=None)
        if base is not None:
            row["tokens_agree"] = answers_agree(row["tokens"], base["tokens"], eos, row["method"] in peers.PEERS)
        if base is None or "prefill_flops" not in row:
            continue
        row["flops_limit"] = base["prefill_flops"] / row["prefill_flops"]
        row["speedup"] = base["prefill_seconds"] / row["prefill_seconds"]
        row["efficiency"] = row["speedup"] / row["flops_limit"]
        row["flops_limit_causal"] = base["prefill_flops_causal"] / row["prefill_flops_causal"]
        row["efficiency_causal"] = row["speedup"] / row["flops_limit_causal"]
        row["ttft_speedup"] = base["ttft_seconds"] / row["ttft_seconds"]
        row["selection_share"] = row["selection_seconds"] / base["prefill_seconds"]
        row["kv_cache_share"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]
        row.update(first_token(base["first_token_logits"], row["first_token_logits"]))
    for row in rows:
        row.pop("first_token_logits", None)


def answers_agree(tokens: list[int], reference: list[int], eos: set, forced: bool) -> bool | None:
    """Whether a row answers as the `none` row (reference) does, up to its first EOS. A stock row
    (`forced`) ran generate() with min_new_tokens, which holds EOS back to time a fixed count: it
    agrees when the reference's answer before its EOS starts its tokens."""
    if not tokens:
        return None
    answer = _answer(reference, eos)
    if forced and answer and answer[-1] in eos:
        return tokens[:len(answer) - 1] == answer[:-1]
    return _answer(tokens, eos) == answer


def _answer(tokens: list[int], eos: set) -> list[int]:
    """The tokens up to and including the first EOS: what a user would have been shown."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def _gpu(loaded):
    import torch

    return torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None


COLUMNS = ("method", "ratio", "kept", "prefill", "speed-up", "FLOPs limit", "efficiency", "select", "TTFT",
           "decode tok/s", "end to end", "vs stock", "KV cache", "peak mem", "agrees")
# Which columns go first when the terminal is narrow (higher goes first; the method always stays).
DROP_ORDER = (0, 1, 4, 2, 3, 7, 6, 9, 5, 1, 0, 1, 8, 8, 6)


def table(result: dict, width: int | None = None):
    from sharp_cli.report import count, fit_table, fmt_bytes

    title = (f"sharp bench: {result['model']}{' (random weights)' if result['random_weights'] else ''} on "
             f"{result['gpu'] or result['device']}, {result['quant']}/{result['dtype']}, "
             f"{result['frames']} frames, K={result['layer']}, {count(result['decode_tokens'], 'new token')}, "
             f"median of {result['iters']}{', CUDA graphs' if result['cuda_graphs'] else ''}")

    def fmt(x, spec, suffix=""):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"

    def ms(x):
        return fmt(None if x is None else x * 1000, ".1f", " ms")

    rows, unsteady, failed = [], False, []
    for r in result["rows"]:
        if "error" in r:
            failed.append(f"{r['method']} failed: {r['error']}")
            continue
        flag = "" if r.get("steady") else "~"
        unsteady |= bool(flag)
        kept = f"{r['visual_tokens_kept']:,}/{r['visual_tokens_total']:,}" if "visual_tokens_kept" in r else "-"
        agrees = "-" if r.get("tokens_agree") is None else ("yes" if r["tokens_agree"] else "no")
        if r.get("first_token_kl") is not None and r["method"] != "none":
            agrees += f" (KL {r['first_token_kl']:.3f})"
        eager = r.get("decode_mode") == "eager" and result["device"].startswith("cuda")
        rows.append([
            r["method"], f"{r['ratio']:.2f}", kept, ms(r.get("prefill_seconds")), fmt(r.get("speedup"), ".2f", "x"),
            fmt(r.get("flops_limit"), ".2f", "x"), fmt(r.get("efficiency"), ".0%"),
            ms(r.get("selection_seconds")), ms(r.get("ttft_seconds")),
            fmt(r.get("decode_tokens_per_second"), ".1f") + (" (eager)" if eager else ""),
            ms(r.get("e2e_seconds")) + flag, fmt(r.get("e2e_speedup"), ".2f", "x"),
            fmt_bytes(r["kv_cache_bytes"]) if r.get("kv_cache_bytes") is not None else "-",
            fmt_bytes(r.get("peak_memory_bytes")), agrees,
        ])
    t = fit_table(title, list(COLUMNS), rows, width, priority=list(DROP_ORDER))
    notes = [t.caption] if t.caption else []
    if unsteady:
        notes.append(f"~ this row's end-to-end times spread by more than {UNSTEADY:.0%} between runs (or too few "
                     "runs): do not trust its speed-ups; raise --iters or free the machine")
    firsts = [f"{r['method']} {r['first_answer_seconds']:.1f} s" for r in result["rows"]
              if r.get("first_answer_seconds") is not None and r["method"] in ("none", *peers.PEERS)]
    if firsts:
        notes.append("first answer of a row (untimed warm-up: graph captures, compilation, the prior pass): "
                     + ", ".join(firsts))
    notes += failed
    t.caption = "\n".join(notes) or None
    t.caption_justify = "left"
    return t


def plot(result: dict, path: str) -> None:
    from sharp_cli.errors import UsageError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'sharp-cli[plot]'") from None
    rows = [r for r in result["rows"] if r["method"] not in ("none", *peers.PEERS) and r.get("speedup")]
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

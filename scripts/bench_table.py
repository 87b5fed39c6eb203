"""Markdown tables for docs/benchmarks.md from `sharp bench --output-json` files.

    python scripts/bench_table.py docs/results/h100-*.json

Every file named is read; what is not a bench result (an `sharp ask --json` record, broken JSON)
is skipped with a line on stderr saying why. Missing values (a CPU run has no peak GPU memory,
older files lack later columns) print as "-". The causal-aware FLOPs limit is taken from the file,
or recomputed from its token counts with the model's shipped config when the file predates it.
"""

from __future__ import annotations

import json
import sys

HEADER = ("| method | ratio | visual kept | LLM prefill | speed-up | FLOPs limit | efficiency | causal limit | "
          "eff. vs causal | selection | TTFT | KV cache | peak mem |")


class Skip(Exception):
    """Not a bench result this script can read; the message says why."""


def load(path: str) -> dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise Skip(exc.strerror or str(exc)) from None
    except json.JSONDecodeError as exc:
        raise Skip(f"not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and "answer" in data and "rows" not in data:
        raise Skip("a `sharp ask` result, not a `sharp bench` one")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise Skip("no bench rows in it")
    return data


def causal_limits(data: dict, name: str) -> list:
    """Per row: the file's causal FLOPs limit, else recomputed from the shipped config, else None."""
    rows = data["rows"]
    if all(r.get("flops_limit_causal") is not None for r in rows):
        return [r["flops_limit_causal"] for r in rows]
    base = next((r for r in rows if r.get("method") == "none"), None)
    try:
        from sharp_cli import measure
        from sharp_cli.models.random_init import load_config

        dims = measure.text_dims(load_config(name))
    except Exception:  # a model without a shipped config: the column stays empty
        return [r.get("flops_limit_causal") for r in rows]
    out = []
    for r in rows:
        try:
            seq, kept, k = base["sequence_tokens"], r["tokens_after_pruning"], r.get("layer") or 2
            full = measure.prefill_flops(dims, seq, seq, k, measure.causal_layer_flops)
            out.append(full / measure.prefill_flops(dims, seq, kept, k, measure.causal_layer_flops))
        except (KeyError, TypeError, ZeroDivisionError):
            out.append(r.get("flops_limit_causal"))
    return out


def fmt(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:{spec}}{unit}"


def table(path: str, data: dict) -> list[str]:
    name = str(data.get("model", "?")).split("random-models/")[-1].replace("--", "/")
    size = data.get("frame_size") or ["?", "?"]
    graphs = {True: "CUDA graphs", False: "no CUDA graphs"}.get(data.get("cuda_graphs"), "CUDA graphs: ?")
    lines = ["", f"**{name}**, {data.get('quant', '?')}/{data.get('dtype', '?')}, {data.get('frames', '?')} frames "
             f"{size[0]}x{size[1]}, K={data.get('layer', '?')}, {graphs}, median of {data.get('iters', '?')} "
             f"after {data.get('warmup', '?')} warm-up, {data.get('gpu') or data.get('device', '?')} (`{path}`)", "",
             HEADER, "|---" * HEADER.count(" | ") + "|---|"]
    for r, limit_c in zip(data["rows"], causal_limits(data, name)):
        speedup = r.get("speedup")
        vs_causal = speedup / limit_c if speedup is not None and limit_c else None
        kept, total = r.get("visual_tokens_kept"), r.get("visual_tokens_total")
        selection = fmt(r.get("selection_seconds"), ".2f", 1e3, " ms")
        if r.get("selection_share") is not None:
            selection += f" ({r['selection_share']:.1%})"
        lines.append(" | ".join([
            f"| {r.get('method', '?')}", fmt(r.get("ratio"), ".2f"),
            f"{kept:,}/{total:,}" if kept is not None and total is not None else "-",
            fmt(r.get("prefill_seconds"), ".1f", 1e3, " ms"), fmt(speedup, ".2f", unit="x"),
            fmt(r.get("flops_limit"), ".2f", unit="x"), fmt(r.get("efficiency"), ".0%"), fmt(limit_c, ".2f", unit="x"),
            fmt(vs_causal, ".0%"), selection, fmt(r.get("ttft_seconds"), ".0f", 1e3, " ms"),
            fmt(r.get("kv_cache_bytes"), ".1f", 2**-20, " MiB"), fmt(r.get("peak_memory_bytes"), ".2f", 2**-30, " GiB"),
        ]) + " |")
    return lines


def main(paths: list[str]) -> int:
    made, skipped = 0, []
    for path in paths:
        try:
            lines = table(path, load(path))
        except Skip as why:
            skipped.append(path)
            print(f"skipped {path}: {why}", file=sys.stderr)
            continue
        print("\n".join(lines))
        made += 1
    print(f"{made} table(s) from {len(paths)} file(s); {len(skipped)} skipped", file=sys.stderr)
    return 0 if made or not paths else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

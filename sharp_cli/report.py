"""What a run cost, as a Rich table on stderr and as flat JSON on stdout."""

from __future__ import annotations

import json
import sys


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def ask_record(loaded, clip, cfg, answer) -> dict:
    """The flat JSON object of `sharp ask --json` (keys are a public interface: add, never rename)."""
    layout = answer.encoded.layout
    n = layout.num_visual
    kept = int(answer.prefill.kept.numel()) if answer.prefill.kept is not None else n
    pruned = cfg.prunes
    return {
        "answer": answer.text,
        "model": loaded.name,
        "method": cfg.method,
        "ratio": cfg.ratio if pruned else 1.0,
        "layer": cfg.layer if pruned else None,
        "frames": int(len(clip.indices)),
        "video": str(clip.path),
        "decoder": clip.backend,
        "token_grid": list(layout.grid),
        "sequence_tokens": int(layout.seq_len),
        "visual_tokens_total": int(n),
        "visual_tokens_kept": kept,
        "vision_seconds": answer.vision_seconds,
        "prefill_seconds": answer.prefill.seconds,
        "selection_seconds": answer.prefill.selection_seconds,
        "prior_seconds": answer.prior.seconds,
        "prior_cached": answer.prior.cached,
        "decode_seconds": answer.decode_seconds,
        "new_tokens": len(answer.tokens),
        "decode_tokens_per_second": answer.decoded.tokens_per_second,
        "decode_mode": answer.decoded.mode,
        "decode_capture_seconds": answer.decoded.capture_seconds,
        "stop": answer.decoded.stop,
        "answer_seconds": answer.seconds,
        "video_cache": answer.extra.get("cache"),  # {"vision", "prefix"}: reused for this question
        "kv_cache_bytes": answer.prefill.kv_cache_bytes,
        "kv_cache_bytes_unpruned": answer.prefill.kv_cache_bytes_unpruned,
        "kv_cache_bytes_saved": answer.prefill.kv_cache_bytes_unpruned - answer.prefill.kv_cache_bytes,
        "peak_memory_bytes": answer.peak_memory_bytes,
        "device": str(loaded.device),
        "gpu": _gpu_name(loaded.device),
        "quant": loaded.quant,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "random_weights": loaded.random_weights,
        "options": cfg.as_dict(),
    }


def _gpu_name(device) -> str | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


def ask_table(record: dict):
    from rich.table import Table

    table = Table(title="sharp ask", show_header=True, header_style="bold", title_justify="left")
    table.add_column("", style="cyan", no_wrap=True)
    table.add_column("value")
    quant = record["quant"] if record["quant"] != "none" else (
        "none (CPU: no quantization)" if record["device"] == "cpu" else "none")
    method = record["method"] if record["method"] == "none" else (
        f"{record['method']}  ratio {record['ratio']}  layer K={record['layer']}")
    rows = [
        ("model", record["model"] + ("  (random weights)" if record["random_weights"] else "")),
        ("device / quant", f"{record['gpu'] or record['device']} / {quant} / {record['dtype']}"),
        ("method", method),
        ("frames sampled", f"{record['frames']} ({record['decoder']}), token grid {'x'.join(map(str, record['token_grid']))}"),
        ("visual tokens", f"{record['visual_tokens_kept']:,} kept of {record['visual_tokens_total']:,}"),
        *([("model load", fmt_seconds(record["load_seconds"]))] if record.get("load_seconds") is not None else []),
        *([("video decoding", fmt_seconds(record["video_seconds"]))] if record.get("video_seconds") is not None else []),
        ("vision encoder", fmt_seconds(record["vision_seconds"])),
        ("LLM prefill", fmt_seconds(record["prefill_seconds"])
         + ("  (first run in this process: includes CUDA warm-up; see --warmup)"
            if record["device"].startswith("cuda") and not record.get("warmup") else "")),
    ]
    if record["method"] != "none":
        rows.append(("  selection step", fmt_seconds(record["selection_seconds"])))
    if record["options"]["method"] == "sharp" and record["options"]["debias"] != "none":
        rows.append(("  positional prior", "from cache" if record["prior_cached"]
                     else f"computed, {fmt_seconds(record['prior_seconds'])} (cached for next time)"))
    saved = record["kv_cache_bytes_saved"]
    share = saved / record["kv_cache_bytes_unpruned"] if record["kv_cache_bytes_unpruned"] else 0
    rows += [
        ("KV cache", f"{fmt_bytes(record['kv_cache_bytes'])} (unpruned {fmt_bytes(record['kv_cache_bytes_unpruned'])})"),
        ("memory saved", f"{fmt_bytes(saved)} of KV cache ({share:.0%})"),
        ("peak GPU memory", fmt_bytes(record["peak_memory_bytes"]) if record["peak_memory_bytes"] is not None
         else "n/a (CPU)"),
        ("decode", f"{record['new_tokens']} tokens"
         + (f", {record['decode_tokens_per_second']:.1f} tok/s" if record["decode_tokens_per_second"] else "")
         + f" ({record['decode_mode']}"
         + (f", captured in {fmt_seconds(record['decode_capture_seconds'])}" if record["decode_capture_seconds"] else "")
         + f"; stopped at {'EOS' if record['stop'] == 'eos' else record['stop']})"),
        ("answer, end to end", fmt_seconds(record["answer_seconds"]) + "  (vision + prior + prefill + decode)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

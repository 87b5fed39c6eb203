"""What a run cost, as a Rich table on stderr and as flat JSON on stdout."""

from __future__ import annotations

import json
import sys

from sharp_cli.jsonl import plain


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


def count(n: int, word: str) -> str:
    """'1 token', '2 tokens'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
        "notes": list(clip.notes),  # what decoding the video said (fewer frames than asked, a fallback, ...)
        "decoder": clip.backend,
        "token_grid": list(layout.grid),
        "sequence_tokens": int(layout.seq_len),
        "visual_tokens_total": int(n),
        "visual_tokens_kept": kept,
        "prepare_seconds": answer.prepare_seconds,
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
        "decode_batch": answer.extra.get("decode_batch", 1),  # the most answers that shared one of its steps
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


def ask_table(record: dict, width: int | None = None):
    """The cost of one answer: a two-column table, or, when it would not fit in `width` columns
    (stderr redirected is 80), one "name: value" line per row, wrapped at spaces with an indent,
    so that no value is cut and no number split."""
    rows = ask_rows(record)
    natural = max(len(k) for k, _ in rows) + max(len(v) for _, v in rows) + 7  # 3 borders, 4 padding
    if width is not None and natural > width:
        return narrow_lines("sharp ask", rows, width)
    from rich.table import Table

    table = Table(title="sharp ask", show_header=True, header_style="bold", title_justify="left")
    table.add_column("", style="cyan", no_wrap=True)
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, value)
    return table


def ask_rows(record: dict) -> list[tuple[str, str]]:
    quant = record["quant"] if record["quant"] != "none" else (
        "none (CPU: no quantization)" if record["device"] == "cpu" else "none")
    method = record["method"] if record["method"] == "none" else (
        f"{record['method']}  ratio {record['ratio']}  layer K={record['layer']}")
    rows = [
        ("model", record["model"] + ("  (random weights)" if record["random_weights"] else "")),
        ("device / quant", f"{record['gpu'] or record['device']} / {quant} / {record['dtype']}"),
        ("method", method),
        ("frames sampled",
         f"{record['frames']} ({record['decoder']}), token grid {'x'.join(map(str, record['token_grid']))}"),
        ("visual tokens", f"{record['visual_tokens_kept']:,} kept of {record['visual_tokens_total']:,}"),
        *([("model load", fmt_seconds(record["load_seconds"]))] if record.get("load_seconds") is not None else []),
        *([("video decoding", fmt_seconds(record["video_seconds"])
            # a local `sharp ask` (the one record with a load time) decodes while the model loads
            + ("  (during the model load)" if record.get("load_seconds") is not None else ""))]
          if record.get("video_seconds") is not None else []),
        *([("processor", fmt_seconds(record["prepare_seconds"]) + "  (frames -> pixels, prompt -> tokens)")]
          if record.get("prepare_seconds") is not None else []),
        ("vision encoder", fmt_seconds(record["vision_seconds"])),
        ("LLM prefill", fmt_seconds(record["prefill_seconds"])
         + ("  (first run in this process: includes CUDA warm-up; see --warmup)"
            if record["device"].startswith("cuda") and not record.get("warmup") and not record.get("server")
            else "")),
    ]
    if record["method"] != "none":
        rows.append(("  selection step", fmt_seconds(record["selection_seconds"])))
    if record["options"]["method"] == "sharp" and record["options"]["debias"] != "none":
        rows.append(("  positional prior", "from cache" if record["prior_cached"]
                     else f"computed, {fmt_seconds(record['prior_seconds'])} (cached for next time)"))
    saved = record["kv_cache_bytes_saved"]
    share = saved / record["kv_cache_bytes_unpruned"] if record["kv_cache_bytes_unpruned"] else 0
    rows += [
        ("KV cache",
         f"{fmt_bytes(record['kv_cache_bytes'])} (unpruned {fmt_bytes(record['kv_cache_bytes_unpruned'])})"),
        ("memory saved", f"{fmt_bytes(saved)} of KV cache ({share:.0%})"),
        ("peak GPU memory", fmt_bytes(record["peak_memory_bytes"]) if record["peak_memory_bytes"] is not None
         else "n/a (CPU)"),
        ("decode", count(record["new_tokens"], "token")
         + (f", {record['decode_tokens_per_second']:.1f} tok/s" if record["decode_tokens_per_second"] else "")
         + f" ({record['decode_mode']}"
         + (f", up to {record['decode_batch']} answers a step" if record.get("decode_batch", 1) > 1 else "")
         + (f", captured in {fmt_seconds(record['decode_capture_seconds'])}"
            if record["decode_capture_seconds"] else "")
         + f"; stopped at {'EOS' if record['stop'] == 'eos' else record['stop']})"),
        ("answer, end to end", fmt_seconds(record["answer_seconds"]) + "  (vision + prior + prefill + decode)"),
    ]
    if record.get("server"):
        rows.append(("asked", f"{record['server']}, {fmt_seconds(record['request_seconds'])} from request to "
                     "answer (queue and transfer included)"))
    return rows


def narrow_lines(title: str, rows: list[tuple[str, str]], width: int):
    """rows as "name: value" lines for a narrow stderr (rich Text, no markup)."""
    import textwrap

    from rich.text import Text

    lines = [title]
    for name, value in rows:
        first = f"{name}: "  # sub-rows keep their indent
        wrapped = textwrap.wrap(value, width=max(24, width), initial_indent=first, subsequent_indent="      ",
                                break_long_words=False, break_on_hyphens=False) or [first]
        lines += wrapped
    return Text("\n".join(lines))


def fit_table(title: str, headers: list[str], rows: list[list[str]], width: int | None,
              priority: list[int] | None = None, justify: list[str] | None = None):
    """A Rich table of `rows` that fits `width` terminal columns without cutting a cell: cells
    never wrap (a number is whole or absent), and when the table is too wide, columns go, the
    highest `priority` number first (the first column always stays), named in the caption. For
    sharp bench's and eval's wide tables; `width` None keeps every column."""
    from rich.cells import cell_len
    from rich.table import Table

    widths = [max([cell_len(h)] + [cell_len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    keep = list(range(len(headers)))
    priority = priority or list(range(len(headers)))
    by_drop = sorted(range(1, len(headers)), key=lambda i: (-priority[i], -i))
    dropped = []

    def total(cols):  # each column: its cells and 2 of padding, plus one border between and around
        return sum(widths[i] + 3 for i in cols) + 1

    while width is not None and total(keep) > width and by_drop:
        gone = by_drop.pop(0)
        keep.remove(gone)
        dropped.append(headers[gone])
    t = Table(title=title, title_justify="left", header_style="bold")
    for i in keep:
        side = (justify or ["left"] + ["right"] * (len(headers) - 1))[i]
        t.add_column(headers[i], justify=side, no_wrap=True, min_width=widths[i])
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    if dropped:
        t.caption = f"not shown at {width} columns: {', '.join(dropped)} (all in --json)"
        t.caption_justify = "left"
    return t


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=plain) + "\n")
    sys.stdout.flush()

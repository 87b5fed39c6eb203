"""The Rich table of `sharp eval` (stderr): one row per method and ratio, folded to the width.

Columns go in priority order: method, ratio, accuracy and the two intervals first, then spread,
seeds, tie audit and needle recall, then the rest. When they do not fit in the console's width (a
terminal's, or 80 when stderr is a file), the table is folded: the columns that fit come first and
the others follow in a second table, again led by method and ratio; no cell is cut, and what fits
in neither is named below them (every figure is in --json).
"""

from __future__ import annotations

MAX_CATEGORY_COLUMNS = 8
KEYS = 2  # method and ratio lead every folded part
MAX_PARTS = 2  # a third part would be more scrolling than reading


def table(result: dict, width: int | None = None):
    """A Rich renderable: the table, folded into at most MAX_PARTS parts when `width` is too narrow
    for one (what still does not fit is named below it: it is all in --json), then the notes."""
    from rich.console import Group
    from rich.text import Text

    headers, rows, priority = _cells(result)
    categories = [i for i, h in enumerate(headers) if h in _shown_categories(result["rows"])]
    parts = fold([[_width(h)] + [_width(r[i]) for r in rows] for i, h in enumerate(headers)], width, priority,
                 together=[categories])
    dropped = [headers[i] for cols in parts[MAX_PARTS:] for i in cols[KEYS:]]
    tables = []
    for n, cols in enumerate(parts[:MAX_PARTS]):
        title = _title(result) if n == 0 else "(continued)"
        tables.append(_rich(title, [headers[i] for i in cols], [[r[i] for i in cols] for r in rows]))
    notes = _captions(result, headers)
    if dropped:
        notes.append(f"not shown at {width} columns: {', '.join(dropped)} (all in --json)")
    return Group(*tables, *([Text("\n".join(notes))] if notes else []))


def fold(widths: list[list[int]], width: int | None, priority: list[int], together=()) -> list[list[int]]:
    """Column indices of each folded part. widths[i]: the cell widths of column i (header first).
    The first KEYS columns lead every part; the others fill the parts in priority order (lower
    first, then left to right), each part as many as fit in `width`; the columns of a group in
    `together` (lists of indices) go into one part or none. A column too wide for any part goes
    alone with the keys. width None: one part."""
    need = [max(w) + 3 for w in widths]  # a cell, its 2 of padding and one border; +1 border per table
    keys = list(range(min(KEYS, len(widths))))
    grouped = {i for group in together for i in group}
    units = [[i] for i in range(len(keys), len(widths)) if i not in grouped] + [list(g) for g in together if g]
    units.sort(key=lambda u: (min(priority[i] for i in u), u[0]))
    if width is None:
        return [keys + sorted(i for u in units for i in u)]
    parts = []
    while units:
        used = 1 + sum(need[i] for i in keys)
        part = []
        for unit in list(units):
            cost = sum(need[i] for i in unit)
            if not part or used + cost <= width:  # the first one goes even if alone it is too wide
                part += unit
                used += cost
                units.remove(unit)
        parts.append(keys + sorted(part))
    return parts or [keys]


def _cells(result: dict):
    from sharp_cli.evaluate import headline
    from sharp_cli.report import fmt_seconds

    rows = result["rows"]
    shown = _shown_categories(rows)
    seeded = any(row.get("seeds_planned", 1) > 1 for row in rows)
    fastv = any(row.get("vs_fastv") for row in rows)
    none = any(row.get("vs_none") for row in rows)
    ties = any(row.get("tie_share") is not None for row in rows)
    recall = any(row.get("needle_recall") is not None for row in rows)
    agreement = any(row.get("agreement_questions") for row in rows)
    unparsed = any(row["unparsed"] for row in rows)
    errors = any(row["errors"] for row in rows)
    head = headline.column(result)
    # (header, priority: lower stays in the first part, the cell of a row)
    columns = [
        ("method", 0, lambda r: r["method"]), ("ratio", 0, lambda r: f"{r['ratio']:.2f}"),
        ("accuracy", 0, lambda r: _pct(r["accuracy"])),
        # MLVU's M-Avg, MVBench's task mean: the benchmark's headline beside the per-question accuracy
        *[(head, 0, lambda r: _pct((r.get("headline") or {}).get("value")))] * bool(head),
        *[("vs fastv", 1, lambda r: _diff(r.get("vs_fastv")))] * fastv,
        *[("vs none", 1, lambda r: _diff(r.get("vs_none")))] * none,
        *[("spread", 2, _spread), ("seeds", 3, _seeds)] * seeded,
        *[("ties", 3, lambda r: _pct(r.get("tie_share")))] * ties,
        *[("recall@k", 3, lambda r: _pct(r.get("needle_recall")))] * recall,
        ("answered", 4, lambda r: f"{r['questions']}/{r['of']}"),
        ("% of none", 5, lambda r: _pct(r["relative_accuracy"])),
        *[(c, 7, lambda r, c=c: _pct(r["categories"].get(c))) for c in shown],
        *[("agree", 5, lambda r: _pct(r.get("answer_agreement"))),
          ("top-1", 6, lambda r: _pct(r.get("first_token_agreement"))),
          ("KL", 6, lambda r: "-" if r.get("first_token_kl") is None else f"{r['first_token_kl']:.3g}")] * agreement,
        *[("unparsed", 4, lambda r: str(r["unparsed"]))] * unparsed,
        *[("errors", 4, lambda r: str(r["errors"]))] * errors,
        ("prefill", 6, lambda r: "-" if r["prefill_seconds"] is None else fmt_seconds(r["prefill_seconds"])),
        ("kept", 5, lambda r: "-" if r["visual_tokens_kept"] is None
         else f"{r['visual_tokens_kept']:,.0f}/{r['visual_tokens_total']:,.0f}"),
    ]
    headers = [c[0] for c in columns]
    return headers, [[c[2](row) for c in columns] for row in rows], [c[1] for c in columns]


def _shown_categories(rows: list[dict]) -> list[str]:
    categories = list(dict.fromkeys(c for row in rows for c in row["categories"]))
    return categories if len(categories) <= MAX_CATEGORY_COLUMNS else []


def _title(result: dict) -> str:
    settings = result["settings"]
    return (f"sharp eval: {result['data']} ({result['format']}), {result['questions']} questions, "
            f"{settings['model']}{' (random weights)' if settings['random_weights'] else ''}, "
            f"K={settings['options']['layer']}")


def _captions(result: dict, headers: list[str]) -> list[str]:
    from sharp_cli.evaluate import headline

    rows = result["rows"]
    captions = [line] if (line := headline.caption(result)) else []
    categories = {c for row in rows for c in row["categories"]}
    if len(categories) > MAX_CATEGORY_COLUMNS:
        captions.append(f"{len(categories)} categories: per-category accuracy is in --json")
    if "vs fastv" in headers or "vs none" in headers:
        resamples = (result.get("bootstrap") or {}).get("resamples", 0)
        interval = (f"[95% paired bootstrap interval, {resamples:,} resamples of the questions]; ns: the interval "
                    "includes 0" if resamples else "(no intervals: --bootstrap 0)")
        captions.append(f"vs fastv, vs none: accuracy minus fastv's at the same ratio, and minus unpruned, in points "
                        + interval)
    if "spread" in headers:
        captions.append("accuracy: mean over seeds; spread: lowest-highest over seeds; seeds: how many ran "
                        "(skipped: the first seed tied nothing, later ones would answer the same)")
    if "ties" in headers:
        captions.append("ties: mean share of the kept tokens tied with the first dropped one (-: not reported)")
    if "recall@k" in headers:
        captions.append("recall@k: mean share of the needle tokens (those showing the answer) that were kept")
    if "agree" in headers:
        captions.append("agree, top-1, KL: the answer, the first answer token, and KL(none || method) of its "
                        "distribution, against the unpruned model (none)")
    return captions


def _rich(title: str, headers: list[str], rows: list[list[str]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for h in headers:
        t.add_column(h, justify="left" if h == "method" else "right", no_wrap=True, min_width=_width(h))
    for r in rows:
        t.add_row(*r)
    return t


def _width(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _diff(d: dict | None) -> str:
    """+8.5 [+3.0,+14.0] (points); ns when the interval includes 0; no interval without resamples."""
    if not d:
        return "-"
    text = f"{100 * d['difference']:+.1f}"
    if d.get("low") is None:
        return text
    text += f" [{100 * d['low']:+.1f},{100 * d['high']:+.1f}]"
    return text if d["significant"] else text + " ns"


def _spread(row: dict) -> str:
    if row.get("accuracy_min") is None or len(row.get("seeds", [])) < 2:
        return "-"
    return f"{100 * row['accuracy_min']:.1f}-{100 * row['accuracy_max']:.1f}"


def _seeds(row: dict) -> str:
    ran, skipped = len(row.get("seeds", [])), row.get("seeds_skipped", 0)
    return f"{ran} ({skipped} skipped)" if skipped else str(ran)

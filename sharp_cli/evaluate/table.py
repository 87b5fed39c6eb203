"""The Rich table of `sharp eval` (stderr): one row per method and ratio."""

from __future__ import annotations

MAX_CATEGORY_COLUMNS = 8


def table(result: dict):
    from rich.table import Table

    from sharp_cli.evaluate import headline
    from sharp_cli.report import fmt_seconds

    rows = result["rows"]
    settings = result["settings"]
    categories = list(dict.fromkeys(c for row in rows for c in row["categories"]))
    shown = categories if len(categories) <= MAX_CATEGORY_COLUMNS else []
    title = (f"sharp eval: {result['data']} ({result['format']}), {result['questions']} questions, "
             f"{settings['model']}{' (random weights)' if settings['random_weights'] else ''}, "
             f"K={settings['options']['layer']}")
    unparsed = any(row["unparsed"] for row in rows)
    errors = any(row["errors"] for row in rows)
    agreement = any(row.get("agreement_questions") for row in rows)
    t = Table(title=title, title_justify="left", header_style="bold")
    head = headline.column(result)  # MLVU's M-Avg, MVBench's task mean: beside the per-question accuracy
    columns = ["method", "ratio", "answered", "accuracy", *([head] if head else []), "% of none", *shown]
    columns += ["agree", "top-1", "KL"] * agreement
    columns += ["unparsed"] * unparsed + ["errors"] * errors + ["prefill", "kept"]
    for col in columns:
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    for row in rows:
        kept, total = row["visual_tokens_kept"], row["visual_tokens_total"]
        cells = [row["method"], f"{row['ratio']:.2f}", f"{row['questions']}/{row['of']}", _pct(row["accuracy"]),
                 *([_pct(row["headline"]["value"])] if head else []),
                 _pct(row["relative_accuracy"]), *(_pct(row["categories"].get(c)) for c in shown)]
        if agreement:  # with the unpruned answer: the answer, the first token's argmax, KL of its distribution
            kl = row.get("first_token_kl")
            cells += [_pct(row.get("answer_agreement")), _pct(row.get("first_token_agreement")),
                      "-" if kl is None else f"{kl:.3g}"]
        cells += [str(row["unparsed"])] * unparsed + [str(row["errors"])] * errors
        cells += ["-" if row["prefill_seconds"] is None else fmt_seconds(row["prefill_seconds"]),
                  "-" if kept is None else f"{kept:,.0f}/{total:,.0f}"]
        t.add_row(*cells)
    captions = [line] if (line := headline.caption(result)) else []
    if categories and not shown:
        captions.append(f"{len(categories)} categories: per-category accuracy is in --json")
    if agreement:
        captions.append("agree, top-1, KL: the answer, the first answer token, and KL(none || method) of its "
                        "distribution, against the unpruned model (none)")
    t.caption = "\n".join(captions) or None
    return t


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"

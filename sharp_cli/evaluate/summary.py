"""The summary of `sharp eval`: one row per (method, ratio), over its seeds, with uncertainty.

Per row: accuracy as the mean over seeds of each seed's accuracy, its spread (lowest, highest and
standard deviation over seeds), paired bootstrap intervals of the difference from fastv at the same
ratio and from unpruned (`none`) (stats.py; per question, correctness is first averaged over the
seeds), the tie audit (mean share of kept tokens tied with the first dropped one), needle recall@k
(needles.py), per-category accuracy, agreement with `none` (agreement.py), prefill time and kept
tokens. docs/eval.md describes every field.
"""

from __future__ import annotations

from sharp_cli.evaluate import stats
from sharp_cli.evaluate.runner import key, line_key, untied

TIE_WARNING = 0.05  # mean tie share above which a cell's kept sets are partly chosen by the seed


def summarize(records: list[dict], items: list, cells: list[tuple[str, float, int]],
              resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED,
              versus: dict[str, str] | None = None) -> list[dict]:
    """One row per (method, ratio) of `cells`. versus: method -> another method of the same records;
    its row gets "vs_method" ({"method", "difference", "low", "high", ...}: a paired bootstrap
    against that method at the same ratio, e.g. an ablation against the full method)."""
    from sharp_cli.evaluate import agreement

    by_key: dict = {}
    for record in records:
        k = line_key(record)
        if k not in by_key or by_key[k].get("retry"):  # a later answer replaces a failed cell's line
            by_key[k] = record
    ids = [str(item.id) for item in items]
    references = {i: by_key[k] for i in ids if (k := key(i, "none", 1.0, 0)) in by_key}
    options_of = {str(item.id): item.options for item in items}
    planned: dict[tuple[str, float], list[int]] = {}
    for method, ratio, s in cells:
        planned.setdefault((method, ratio), []).append(s)
    rows, scores = [], {}
    for (method, ratio), seeds in planned.items():
        found = [by_key[k] for s in seeds for i in ids if (k := key(i, method, ratio, s)) in by_key]
        ran = [s for s in seeds if any(r["seed"] == s for r in found)]
        skipped = len(seeds) - len(ran) if ran and untied(by_key, ids, method, ratio, seeds[0]) else 0
        row = _row(method, ratio, found, ran, len(seeds), skipped, len(items), options_of)
        if method == "none":  # the reference itself
            row.update(agreement_questions=0, answer_agreement=None, first_token_agreement=None, first_token_kl=None)
        else:
            row.update(agreement.summarize(found, references, options_of))
        scores[(method, ratio)] = _item_scores(found)
        rows.append(row)
    base = next((r for r in rows if r["method"] == "none"), None)
    for row in rows:
        if base is not None and base["accuracy"] and row["accuracy"] is not None:
            row["relative_accuracy"] = row["accuracy"] / base["accuracy"]
        cell = (row["method"], row["ratio"])
        row["vs_fastv"] = (_compare(scores[cell], scores.get(("fastv", row["ratio"])), ids, resamples, seed)
                           if row["method"] != "fastv" else None)
        row["vs_none"] = (_compare(scores[cell], scores.get(("none", 1.0)), ids, resamples, seed)
                          if row["method"] != "none" else None)
        if versus is not None:
            other = versus.get(row["method"])
            versus_row = _compare(scores[cell], scores.get((other, row["ratio"])), ids, resamples, seed)
            row["vs_method"] = dict(versus_row, method=other) if versus_row else None
    return rows


def _row(method, ratio, found, ran, planned, skipped, asked, options_of) -> dict:
    answered = [r for r in found if not r.get("error")]
    labelled = [r for r in found if r.get("correct") is not None]
    by_seed = {s: _mean([bool(r["correct"]) for r in labelled if r["seed"] == s]) for s in ran}
    spread = stats.spread([a for a in by_seed.values() if a is not None])
    categories: dict[str, list[bool]] = {}
    for record in labelled:
        if record.get("category") is not None:
            categories.setdefault(str(record["category"]), []).append(bool(record.get("correct")))
    ties = [r["tie_share"] for r in answered if r.get("tie_share") is not None]
    recalls = [r["needle_kept"] / r["needle_tokens"] for r in answered
               if r.get("needle_tokens") and r.get("needle_kept") is not None]
    return {
        "method": method, "ratio": ratio, "questions": len({r["item"] for r in found}), "of": asked,
        "answers": len(found), "seeds": ran, "seeds_planned": planned, "seeds_skipped": skipped,
        "correct": sum(bool(r.get("correct")) for r in labelled),
        # Per question over its seeds, then over questions: the mean of the per-seed accuracies when
        # every seed answered every question, and still each question's weight 1 when some seeds
        # skipped some questions (a resumed run that skipped untied seeds for part of the set).
        "accuracy": _mean(list(_item_scores(labelled).values())) if labelled else spread["mean"],
        "accuracy_by_seed": {str(s): a for s, a in by_seed.items()},
        "accuracy_min": spread["min"], "accuracy_max": spread["max"], "accuracy_std": spread["std"],
        "relative_accuracy": None,
        "categories": {c: _mean(v) for c, v in categories.items()},
        "tie_share": _mean(ties), "tie_audited": len(ties),
        "needle_recall": _mean(recalls), "needle_answers": len(recalls),
        "unparsed": sum(r.get("prediction") is None for r in answered if options_of.get(str(r["item"]))),
        "errors": len(found) - len(answered),
        "prefill_seconds": _mean([r["prefill_seconds"] for r in answered if "prefill_seconds" in r]),
        "visual_tokens_kept": _mean([r["visual_tokens_kept"] for r in answered if "visual_tokens_kept" in r]),
        "visual_tokens_total": _mean([r["visual_tokens_total"] for r in answered if "visual_tokens_total" in r]),
    }


def _item_scores(found: list[dict]) -> dict[str, float]:
    """item -> its correctness averaged over the seeds it was answered under (labelled items only)."""
    per: dict[str, list[bool]] = {}
    for record in found:
        if record.get("correct") is not None:
            per.setdefault(str(record["item"]), []).append(bool(record["correct"]))
    return {i: sum(v) / len(v) for i, v in per.items()}


def _compare(mine: dict, other: dict | None, ids: list[str], resamples: int, seed: int) -> dict | None:
    """Paired bootstrap of mine - other over the questions both answered, in the run's item order."""
    if other is None:
        return None
    common = [i for i in ids if i in mine and i in other]
    return stats.paired_difference([mine[i] for i in common], [other[i] for i in common], resamples, seed)


def tie_warning(rows: list[dict], threshold: float = TIE_WARNING) -> str | None:
    """One line naming the cells whose mean tie share is above the threshold, or None."""
    high = [f"{r['method']} {r['ratio']:g} {r['tie_share']:.0%}" for r in rows
            if r.get("tie_share") is not None and r["tie_share"] > threshold]
    if not high:
        return None
    return (f"warning: in {len(high)} cell{'s' * (len(high) > 1)} more than {threshold:.0%} of the kept tokens are "
            f"tied with the first dropped one, so the seeds choose them ({', '.join(high)})")


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None

"""Each benchmark's own headline number, beside sharp's accuracy over questions.

MLVU's M-Avg is the mean of the accuracies of its multiple-choice task types, MVBench's average the
mean over its tasks (lmms-eval: mlvu_aggregate_results_dev; MVBench's leaderboard "Avg"); Video-MME
and LongVideoBench report the accuracy over all questions (lmms-eval: videomme_aggregate_results,
longvideobench_aggregate_results), which is sharp's `accuracy` itself. A mean over groups counts
the groups that have at least one answered question with a gold answer in this run.
"""

from __future__ import annotations

# format -> (the benchmark's name for it, what it is, averaged over groups?)
METRICS = {
    "mlvu": ("M-Avg", "mean of the per-task-type accuracies", True),
    "mvbench": ("Avg", "mean of the per-task accuracies", True),
    "videomme": ("Overall", "accuracy over questions", False),
    "longvideobench": ("Overall", "accuracy over questions", False),
}


def add(rows: list[dict], records: list[dict], items: list, fmt: str) -> None:
    """Give every summary row its `headline`: {metric, value, definition, groups ({group: accuracy})}.
    An item answered under several tie seeds counts once, with the mean of its seeds' answers."""
    if fmt not in METRICS:
        return
    name, definition, by_group = METRICS[fmt]
    answers: dict[tuple, list[bool]] = {}
    for record in records:
        if record.get("correct") is not None:
            cell = (str(record["item"]), record["method"], round(float(record["ratio"]), 6))
            answers.setdefault(cell, []).append(bool(record["correct"]))
    for row in rows:
        groups: dict[str, list[float]] = {}
        for item in items:
            hits = answers.get((str(item.id), row["method"], round(float(row["ratio"]), 6)))
            if by_group and item.group is not None and hits:
                groups.setdefault(item.group, []).append(sum(hits) / len(hits))
        accuracy = {g: sum(v) / len(v) for g, v in groups.items()}
        value = (sum(accuracy.values()) / len(accuracy) if accuracy else None) if by_group else row["accuracy"]
        row["headline"] = {"metric": name, "value": value, "definition": definition, "groups": accuracy}


def column(result: dict) -> str | None:
    """The table column's name (rows carry the value), when the headline is not the accuracy column itself."""
    fmt = result.get("format")
    if fmt not in METRICS or not METRICS[fmt][2] or not all("headline" in row for row in result["rows"]):
        return None
    return METRICS[fmt][0]


def caption(result: dict) -> str | None:
    fmt = result.get("format")
    if fmt not in METRICS:
        return None
    name, definition, by_group = METRICS[fmt]
    counts = {len((row.get("headline") or {}).get("groups") or {}) for row in result["rows"]}
    if by_group:
        return (f"{name}: the benchmark's headline, the {definition} ({max(counts, default=0)} in this run); "
                "accuracy is per question")
    return f"accuracy is the benchmark's headline ({name}, {definition})"

"""`sharp diagnose`: may this model judge a shallow-layer pruning method? The acceptance checks of
docs/eval.md ("Acceptance checks"), each printed with its figure and its threshold.

A model trained on synthetic tasks can answer well and still be useless as a judge: if its
shallow attention is one-hot, any kept set is decided by tie order; if it has no positional bias,
debiasing has nothing to correct. Real video LLMs spread shallow attention, favour the end of the
sequence, park attention on the first tokens and lose accuracy under FastV at K=2 at high
compression. The checks ask the model in hand for each of these:

  attention (diagnose.py's statistics of the last prompt token, layers 1-2, questions and black clips)
    entropy >= 0.6, exact zeros < 1%, top-1 share < 0.2, recency >= 0.5 (content and black);
  sinks      the text before the video takes > 0.5 of the last token's attention, averaged over
             layers 2..L-1;
  prior      the black clip's layer-K attention per token frame is end-heavy (last eighth >= 2x its
             uniform share) or monotone (Spearman >= 0.8);
  pruning    (labelled multiple-choice items) FastV at K keeps >= 95% of unpruned accuracy at
             r=0.5, <= 90% at r=0.15, and loses more at K than at K=L/2 at r=0.15; each decided on
             its value, printed with its paired bootstrap 95% interval over the questions.
"""

from __future__ import annotations

import torch

from sharp_cli.evaluate import diagnose, stats


@torch.inference_mode()
def attention_rows(loaded, clip, question: str, layers, max_pixels=None) -> dict[int, dict]:
    """diagnose.row_stats per layer for one question about one clip (unpruned, batch 1)."""
    from sharp_cli import engine

    inputs = engine.prepare(loaded, clip, question, max_pixels)
    encoded, _ = engine.encode(loaded, inputs)
    text = loaded.adapter.text_model(loaded.model)
    with diagnose.capture(text.config, layers) as rec:
        text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False, **encoded.extra)
    layout = encoded.layout
    first = int(layout.indices[0])  # the text before the video: system prompt, chat header
    sink = torch.arange(0, first, device=layout.indices.device)
    frames = layout.grid[0]
    return {layer: diagnose.row_stats(rec.probs[layer][0], layout.indices, frames, sink) for layer in layers}


def attention_checks(loaded, clips_and_questions, prune_layer: int, max_pixels=None) -> tuple[dict, list[dict]]:
    """Mean statistics per (content|black, layer) over the questions, and the checks they decide."""
    from sharp_cli.prior_pass import black_clip

    layers = list(range(loaded.num_layers))
    rows = {"content": {n: [] for n in layers}, "black": {n: [] for n in layers}}
    for clip, question in clips_and_questions:
        for name, c in (("content", clip), ("black", black_clip(clip))):
            for layer, row in attention_rows(loaded, c, question, layers, max_pixels).items():
                rows[name][layer].append(row)
    means = {name: {layer: diagnose.mean_stats(r) for layer, r in per.items()} for name, per in rows.items()}
    shallow = [n for n in (1, 2) if n < loaded.num_layers]
    t = diagnose.THRESHOLDS

    def avg(name, key, which):
        return sum(means[name][n][key] for n in which) / len(which)

    checks = [
        _check("shallow entropy (layers 1-2)", avg("content", "entropy", shallow), ">=", t["entropy"]),
        _check("exact zeros (layers 1-2)", avg("content", "zeros", shallow), "<", t["zeros"]),
        _check("top-1 share (layers 1-2)", avg("content", "top1", shallow), "<", t["top1"]),
        _check("recency, content (layers 1-2)", avg("content", "recency", shallow), ">=", t["recency"]),
        _check("recency, black clip (layers 1-2)", avg("black", "recency", shallow), ">=", t["recency"]),
    ]
    deep = [n for n in layers if n >= 2]
    if deep:
        checks.append(_check(f"sink share (layers 2-{layers[-1]})", avg("content", "sink", deep), ">", t["sink"]))
    shape = diagnose.profile_shape(means["black"][prune_layer]["frames"])
    checks.append({"check": f"black-clip prior at K={prune_layer}: end-heavy or monotone",
                   "value": round(max(shape["last_eighth"] / 0.25, shape["spearman"] / 0.8), 4), "op": ">=",
                   "threshold": 1.0, "passed": shape["last_eighth"] >= 0.25 or shape["spearman"] >= 0.8,
                   "detail": {k: round(v, 4) for k, v in shape.items()}})
    return means, checks


def pruning_checks(loaded, items_and_clips, prune_layer: int, deep_layer: int, ratios=(0.5, 0.15),
                   max_pixels=None, max_new_tokens: int = 8) -> tuple[dict, list[dict]]:
    """Accuracy of none, FastV at K for each ratio, and FastV at K=deep_layer for the smallest ratio."""
    from sharp_cli import answer as answer_mod
    from sharp_cli.letters import build_prompt, parse_letter
    from sharp_cli.prune.config import PruneConfig
    from sharp_cli.prune.prior import PriorStore

    store = PriorStore(use_disk=False)
    low = min(ratios)
    cells = [("none", 1.0, prune_layer)] + [("fastv", r, prune_layer) for r in ratios] + [("fastv", low, deep_layer)]
    scores: dict[tuple, list[float]] = {c: [] for c in cells}  # 1.0/0.0 per question: accuracy and intervals
    per_category: dict[str, dict] = {}  # where the checks' accuracy comes from: needle tasks or coverage ones
    count = 0
    for item, clip in items_and_clips:
        if not item.options or item.answer is None:
            continue
        count += 1
        mine = per_category.setdefault(item.category or "-", {"questions": 0, **{c: 0 for c in cells}})
        mine["questions"] += 1
        prompt = build_prompt(item.question, item.options)
        for method, ratio, layer in cells:
            cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=ratio, layer=layer))
            out = answer_mod.ask(loaded, clip, prompt, cfg, max_new_tokens=max_new_tokens,
                                 max_pixels=max_pixels, store=store)
            correct = parse_letter(out.text, item.options) == item.answer
            scores[(method, ratio, layer)].append(float(correct))
            mine[(method, ratio, layer)] += correct
    if not count:
        return {}, []
    acc = {f"{m} r={r} K={k}": sum(scores[(m, r, k)]) / count for m, r, k in cells}
    by_category = {name: {"questions": n["questions"],
                          **{f"{m} r={r} K={k}": n[(m, r, k)] / n["questions"] for m, r, k in cells}}
                   for name, n in sorted(per_category.items())}
    none = acc[f"none r=1.0 K={prune_layer}"] or 1e-9
    unpruned = scores[("none", 1.0, prune_layer)]
    checks = []
    for r in ratios:
        kept = acc[f"fastv r={r} K={prune_layer}"] / none
        share = stats.paired_ratio(scores[("fastv", r, prune_layer)], unpruned)
        name = f"FastV K={prune_layer} r={r}: share of unpruned accuracy"
        if r >= 0.5:
            checks.append(_check(name, kept, ">=", 0.95, share and (share["low"], share["high"])))
        elif r <= 0.15:
            checks.append(_check(name, kept, "<=", 0.90, share and (share["low"], share["high"])))
    loss_k = acc[f"none r=1.0 K={prune_layer}"] - acc[f"fastv r={low} K={prune_layer}"]
    loss_deep = acc[f"none r=1.0 K={prune_layer}"] - acc[f"fastv r={low} K={deep_layer}"]
    # loss at K minus loss deep = deep's accuracy minus K's, question by question
    gap = stats.paired_difference(scores[("fastv", low, deep_layer)], scores[("fastv", low, prune_layer)])
    checks.append(_check(f"FastV r={low}: loss at K={prune_layer} minus loss at K={deep_layer}", loss_k - loss_deep,
                         ">", 0.0, gap and (gap["low"], gap["high"])))
    return {"questions": count, "accuracy": acc, "by_category": by_category}, checks


def _check(name: str, value: float, op: str, threshold: float, interval: tuple | None = None) -> dict:
    """A check decided on its point value; `interval` (the paired bootstrap's 95%, over questions) is
    reported beside it, never used to pass a check that the value fails."""
    passed = {">=": value >= threshold, ">": value > threshold, "<": value < threshold, "<=": value <= threshold}[op]
    out = {"check": name, "value": round(float(value), 4), "op": op, "threshold": threshold, "passed": bool(passed)}
    if interval is not None and None not in interval:
        out["interval"] = [round(float(interval[0]), 4), round(float(interval[1]), 4)]
    return out


def table(result: dict):
    from rich.table import Table

    t = Table(title=f"sharp diagnose: {result['model']}, {result['questions']} questions, K={result['layer']}",
              title_justify="left", header_style="bold")
    for col in ("check", "value", "needs", "result"):
        t.add_column(col, justify="left" if col == "check" else "right")
    for c in result["checks"]:
        value = f"{c['value']:.3f}" + (" [{:.3f}, {:.3f}]".format(*c["interval"]) if "interval" in c else "")
        t.add_row(c["check"], value, f"{c['op']} {c['threshold']:g}",
                  "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]")
    return t


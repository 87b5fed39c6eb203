"""The eval table's figures without a model: bootstrap intervals, seed spread, needle-token mapping,
the per-cell summary, the folded table and the settings-mismatch message."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from sharp_cli.evaluate import needles, runner, stats, summary
from sharp_cli.evaluate.items import Item


# -- bootstrap -------------------------------------------------------------------------------------
def test_interval_over_given_resamples_is_the_hand_computed_percentile():
    d = [1.0, 0.0, 0.0, 0.0]
    draws = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 3], [0, 0, 1, 1]])  # means 1, 0, 0.25, 0.5
    low, high = stats.interval(d, [draws[:2], draws[2:]])
    # sorted means 0, .25, .5, 1; linear interpolation at 0.025 * 3 and 0.975 * 3
    assert low == pytest.approx(0.075 * 0.25) and high == pytest.approx(0.5 + 0.925 * 0.5)


@pytest.mark.parametrize("a, b, expected", [
    # d = (1, 0, 0): the mean of 3 draws is k/3, k ~ Binomial(3, 1/3); P(k <= 2) = 26/27 < 0.975,
    # so the 97.5th percentile is 1; P(k = 0) = 8/27 > 0.025, so the 2.5th is 0: not significant.
    ([1, 0, 0], [0, 0, 0], (1 / 3, 0.0, 1.0, False)),
    # d = (1, 1, 1, 0): P(mean = 0) = 1/256, P(mean <= 1/4) = 13/256 > 0.025 -> low 1/4; P(mean = 1) = 81/256.
    ([1, 1, 1, 0], [0, 0, 0, 0], (0.75, 0.25, 1.0, True)),
    ([1] * 50, [0] * 50, (1.0, 1.0, 1.0, True)),  # a known large difference
    ([0] * 50, [1] * 50, (-1.0, -1.0, -1.0, True)),
    ([1, 0, 1, 0], [1, 0, 1, 0], (0.0, 0.0, 0.0, False)),  # the same answers: [0, 0], includes 0
])
def test_paired_difference_hand_computed(a, b, expected):
    got = stats.paired_difference(a, b, resamples=2000, seed=0)
    assert (got["difference"], got["low"], got["high"], got["significant"]) == pytest.approx(expected)
    assert got["questions"] == len(a)


def test_paired_interval_uses_the_same_resample_for_both_methods():
    """b right on half the questions, a right on those and 10 more of 100: paired, the difference
    (0.10) is clearly above 0; resampling the two methods independently would include 0."""
    rng = np.random.default_rng(1)
    b = (rng.random(100) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:10]] = 1.0
    got = stats.paired_difference(a, b)
    assert got["difference"] == pytest.approx(0.10) and got["significant"]
    assert 0.02 < got["low"] < 0.08 and 0.12 < got["high"] < 0.2
    # the unpaired interval for comparison: much wider, includes 0
    ia = np.concatenate(list(stats.resample_indices(100, 2000, 5)))
    ib = np.concatenate(list(stats.resample_indices(100, 2000, 6)))
    unpaired = np.quantile(a[ia].mean(1) - b[ib].mean(1), [0.025, 0.975])
    assert unpaired[0] < 0 < unpaired[1]


def test_bootstrap_is_seeded_and_optional():
    a, b = [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]
    assert stats.paired_difference(a, b, seed=3) == stats.paired_difference(a, b, seed=3)
    off = stats.paired_difference(a, b, resamples=0)
    assert off["difference"] == pytest.approx(2 / 6) and off["low"] is None and off["significant"] is None
    assert stats.paired_difference([], []) is None
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0], [1])


def test_spread_over_seeds():
    assert stats.spread([0.5, 0.7, 0.6]) == pytest.approx({"mean": 0.6, "min": 0.5, "max": 0.7, "std": 0.1})
    assert stats.spread([0.4])["std"] is None and stats.spread([])["mean"] is None


# -- needle tokens ---------------------------------------------------------------------------------
SHARP_TINY = ((128, 128), (16, 4, 4), 2)  # clip pixels, token grid at 112x112, 2 frames per token frame


def test_needle_tokens_by_hand():
    size, grid, step = SHARP_TINY
    frames = list(range(32))
    # frames 5 and 6 -> token frames 2 and 3; x, y 40..50 -> column and row 1 of 4 (32-px cells)
    assert needles.token_numbers([[5, 40, 40, 51, 51], [6, 40, 40, 51, 51]], size, frames, grid, step) == [37, 53]
    assert needles.token_numbers([[0, 30, 0, 34, 10]], size, frames, grid, step) == [0, 1]  # across a cell edge
    assert needles.token_numbers([[0, 0, 0, 32, 32]], size, frames, grid, step) == [0]  # end exclusive
    assert needles.token_numbers([[0, 127, 127, 200, 200]], size, frames, grid, step) == [15]  # clipped to the frame
    assert needles.token_numbers([[40, 0, 0, 8, 8], [3, 9, 9, 9, 20]], size, frames, grid, step) == []  # absent, empty
    # 16 of 32 frames sampled (1, 3, 5, ...): frame 5 is the 3rd, in token frame 1; frame 6 is not sampled
    sampled = list(range(1, 32, 2))
    assert needles.token_numbers([[5, 40, 40, 51, 51], [6, 40, 40, 51, 51]], size, sampled, (8, 4, 4), 2) == [21]
    # one frame per token frame (LLaVA), a 14x14 grid on a 384-px frame
    assert needles.token_numbers([[2, 0, 0, 384, 1]], (384, 384), [0, 1, 2], (3, 14, 14), 1) == list(range(392, 406))
    assert needles.token_numbers([[0, 0, 0, 1, 1]], size, frames, (15, 4, 4), 2) is None  # grid of other frames
    assert needles.recall([37, 53], [1, 37, 99]) == 0.5 and needles.recall([], [1]) is None
    assert needles.recall([1], None) is None


@pytest.mark.parametrize("height, width, boxes", [
    (128, 128, [[5, 40, 40, 51, 51], [6, 40, 40, 51, 51], [9, 58, 90, 70, 100]]),
    (96, 160, [[5, 70, 40, 84, 54], [6, 70, 40, 84, 54], [9, 56, 8, 72, 20]]),  # 3x5 tokens of 32x32 clip pixels
])
def test_needle_tokens_are_the_tokens_whose_pixels_change(height, width, boxes):
    """Independent reference: draw the boxes and ask sharp-tiny's own processor which merged tokens'
    pixels changed (4 patch rows per token in its output), on a square and a non-square clip."""
    from transformers import AutoConfig, AutoProcessor

    from sharp_cli.loading import SHARP_TINY
    from sharp_cli.models import adapter_for
    from sharp_cli.video import VideoClip

    processor, config = AutoProcessor.from_pretrained(SHARP_TINY), AutoConfig.from_pretrained(SHARP_TINY)
    adapter = adapter_for(config)
    assert needles.mappable(processor)
    plain = np.full((32, height, width, 3), 120, np.uint8)
    drawn = plain.copy()
    for frame, x0, y0, x1, y1 in boxes:
        drawn[frame, y0:y1, x0:x1] = (220, 30, 30)
    pixels = []
    for frames in (plain, drawn):
        clip = VideoClip(frames, 8.0, 32, list(range(32)), "memory", "<memory>")
        out = adapter.processor_inputs(processor, adapter.prompt(processor, "q?"), clip, None)
        pixels.append(out["pixel_values_videos"])
    t, gh, gw = (int(x) for x in out["video_grid_thw"][0])
    grid = (t, gh // 2, gw // 2)
    changed = ((pixels[1] - pixels[0]).abs().reshape(-1, 4 * pixels[0].shape[1]).amax(1) > 0.05).nonzero()
    expected = needles.token_numbers(boxes, (width, height), list(range(32)), grid, 2)
    assert expected == changed.reshape(-1).tolist() and len(expected) >= 3


def test_needle_boxes_are_checked_when_read():
    assert needles.check_boxes(None, "x") is None
    assert needles.check_boxes([[1, 2.0, 3, 4, 5]], "x") == [[1, 2, 3, 4, 5]]
    for bad in ([[1, 2, 3]], [1, 2, 3, 4, 5], "box", [[1, 2, 3, 4, True]]):
        with pytest.raises(Exception, match="x: needle_boxes must be"):
            needles.check_boxes(bad, "x")


# -- summary ---------------------------------------------------------------------------------------
def _rec(item, method, ratio, seed, correct, **extra):
    return {"item": item, "method": method, "ratio": ratio, "seed": seed, "correct": correct, "category": None,
            "prediction": "A", "prefill_seconds": 0.1, "visual_tokens_kept": 1, "visual_tokens_total": 2,
            **extra}


def test_summary_over_seeds_intervals_ties_and_recall():
    items = [Item(str(i), "/v.mp4", "q", ["a", "b"], "A") for i in range(4)]
    cells = [("none", 1.0, 0), ("fastv", 0.5, 0), ("fastv", 0.5, 1), ("sharp", 0.5, 0), ("sharp", 0.5, 1)]
    right = {("none", 0): [1, 1, 1, 0], ("fastv", 0): [1, 0, 0, 0], ("fastv", 1): [1, 0, 1, 0],
             ("sharp", 0): [1, 1, 0, 0], ("sharp", 1): [1, 1, 1, 1]}
    records = []
    for (method, seed), marks in right.items():
        for i, ok in enumerate(marks):
            records.append(_rec(str(i), method, 1.0 if method == "none" else 0.5, seed, bool(ok),
                                tie_share=None if method == "none" else 0.25 * i,
                                needle_tokens=4, needle_kept=4 if method == "none" else i))
    rows = summary.summarize(records, items, cells, resamples=0)
    none, fastv, sharp = rows
    assert sharp["seeds"] == [0, 1] and sharp["accuracy_by_seed"] == {"0": 0.5, "1": 1.0}
    assert (sharp["accuracy"], sharp["accuracy_min"], sharp["accuracy_max"]) == (0.75, 0.5, 1.0)
    assert sharp["accuracy_std"] == pytest.approx(math.sqrt(0.125))
    # per item, seeds averaged first: sharp (1, 1, .5, .5), fastv (1, 0, .5, 0), none (1, 1, 1, 0)
    assert sharp["vs_fastv"]["difference"] == pytest.approx(0.375) and sharp["vs_fastv"]["questions"] == 4
    assert sharp["vs_none"]["difference"] == pytest.approx(0.0) and fastv["vs_fastv"] is None
    assert none["vs_none"] is None and none["vs_fastv"] is None  # no fastv at ratio 1
    assert sharp["tie_share"] == pytest.approx(0.375) and none["tie_share"] is None and sharp["tie_audited"] == 8
    assert sharp["needle_recall"] == pytest.approx(1.5 / 4) and none["needle_recall"] == 1.0
    assert sharp["answers"] == 8 and sharp["questions"] == 4 and sharp["correct"] == 6
    warning = summary.tie_warning(rows)
    assert warning.startswith("warning: in 2 cells") and "sharp 0.5 38%" in warning and "\n" not in warning
    assert summary.tie_warning([dict(sharp, tie_share=0.05), dict(fastv, tie_share=None)]) is None


def test_summary_says_which_seeds_were_skipped():
    items = [Item(str(i), "/v.mp4", "q", ["a", "b"], "A") for i in range(2)]
    cells = [("sharp", 0.5, s) for s in range(3)] + [("fastv", 0.5, s) for s in range(3)]
    records = [_rec(str(i), "sharp", 0.5, 0, True, tie_share=0.0) for i in range(2)]
    records += [_rec(str(i), "fastv", 0.5, s, True, tie_share=0.0 if i else 0.1) for i in range(2) for s in (0, 1)]
    sharp, fastv = summary.summarize(records, items, cells)
    assert (sharp["seeds"], sharp["seeds_planned"], sharp["seeds_skipped"]) == ([0], 3, 2)
    assert (fastv["seeds"], fastv["seeds_skipped"]) == ([0, 1], 0)  # tied once: seed 2 is missing, not skipped


def test_accuracy_weighs_every_question_once_when_seeds_cover_part_of_the_set():
    """A resumed run can hold a later seed for some questions only (sharded first, skipped after):
    seed 0 answered q0-q3 (right, right, wrong, wrong), seed 1 only q0-q1 (right). Averaging the
    per-seed accuracies would say 75%; per question over its seeds it is 50%, what every seed shows."""
    items = [Item(str(i), "/v.mp4", "q", ["a", "b"], "A") for i in range(4)]
    cells = [("evs", 0.1, 0), ("evs", 0.1, 1)]
    records = [_rec(str(i), "evs", 0.1, 0, ok, tie_share=0.0) for i, ok in enumerate([True, True, False, False])]
    records += [_rec(str(i), "evs", 0.1, 1, True, tie_share=0.0) for i in range(2)]
    (row,) = summary.summarize(records, items, cells, resamples=0)
    assert row["accuracy"] == pytest.approx(0.5)
    assert row["accuracy_by_seed"] == {"0": 0.5, "1": 1.0}  # the spread still shows each seed's own


# -- the table -------------------------------------------------------------------------------------
def _result(n_categories=4):
    cats = [f"category-{c}" for c in range(n_categories)]
    diff = {"difference": -0.125, "low": -0.375, "high": 0.0, "significant": False, "questions": 8}
    rows = []
    for method, ratio in [("none", 1.0), ("fastv", 0.15), ("random", 0.15), ("sharp", 0.15)]:
        rows.append({"method": method, "ratio": ratio, "questions": 400, "of": 400, "accuracy": 0.825,
                     "relative_accuracy": 0.95, "categories": {c: 0.5 for c in cats}, "seeds": [0, 1, 2],
                     "seeds_planned": 3, "seeds_skipped": 0, "accuracy_min": 0.8, "accuracy_max": 0.85,
                     "vs_fastv": None if method == "fastv" else diff, "vs_none": None if method == "none" else diff,
                     "tie_share": 0.43, "needle_recall": 0.5, "agreement_questions": 400, "answer_agreement": 0.9,
                     "first_token_agreement": 0.9, "first_token_kl": 0.01, "unparsed": 1, "errors": 0,
                     "prefill_seconds": 0.02, "visual_tokens_kept": 38, "visual_tokens_total": 256})
    return {"rows": rows, "questions": 400, "data": "/tmp/heldout/items.jsonl", "format": "sharp",
            "settings": {"model": "sharp-tiny", "random_weights": False, "options": {"layer": 2}},
            "bootstrap": {"resamples": 2000}}


def _render(result, width):
    from rich.console import Console

    from sharp_cli.evaluate.table import table

    out = io.StringIO()
    Console(file=out, width=width or 400, highlight=False).print(table(result, width=width))
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_table_fits_the_width_with_the_key_columns_first(width):
    text = _render(_result(), width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width and "…" not in text
    first_header = next(line for line in lines if "method" in line)
    for name in ("ratio", "accuracy", "vs fastv", "vs none"):
        assert name in first_header
    assert "-12.5 [-37.5,+0.0] ns" in text  # the interval whole, marked not significant
    headers = ["spread", "seeds", "ties", "recall@k", "answered", "% of none", "agree", "top-1", "KL", "unparsed",
               "prefill", "kept", "category-0"]
    shown_or_named = " ".join(lines)
    assert all(h in shown_or_named for h in headers)  # folded into the second part, or named as not shown
    assert text.count("┃ method") <= 2  # at most two parts


def test_table_without_a_width_is_one_table_with_every_column():
    text = _render(_result(), None)
    assert text.count("┃ method") == 1 and "category-3" in text and "not shown" not in text


# -- settings ---------------------------------------------------------------------------------------
def test_settings_differences_name_each_leaf():
    old = {"model": "sharp-tiny", "frames": 32, "options": {"layer": 2, "debias": "divide", "query": "last"}}
    new = {"model": "sharp-tiny", "frames": 16, "options": {"layer": 6, "debias": "divide"}}
    assert runner.differences(old, new) == ("frames: 32 there, 16 now; layer: 2 there, 6 now; "
                                            "query: last there, absent now")
    assert runner.differences(None, new) == "no settings recorded"
    many = runner.differences({str(i): i for i in range(6)}, {str(i): -i for i in range(6)})
    assert many.endswith("; and 1 more") and many.count("there") == 4


def test_paired_ratio_is_the_share_kept_with_a_paired_interval():
    from sharp_cli.evaluate.stats import paired_ratio

    kept = paired_ratio([1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 1, 1])
    assert kept["ratio"] == pytest.approx(3 / 5) and kept["questions"] == 6
    assert kept["low"] <= 3 / 5 <= kept["high"] <= 1.0  # a never beats b on a question here
    same = paired_ratio([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["low"] == same["high"] == 1.0  # the same draw for both: every resample keeps all of it
    assert paired_ratio([1, 0], [0, 0]) is None and paired_ratio([], []) is None
    assert paired_ratio([1, 0, 1], [1, 1, 0], resamples=0)["low"] is None

"""bench.py: a method's row reports what the question pipeline (answer.run) measured, pass by pass."""

from __future__ import annotations

import pytest

from conftest import make_clip
from sharp_cli import answer, bench
from sharp_cli.prune import PruneConfig

PIXELS = 56 * 56 * 4


@pytest.fixture
def passes(monkeypatch):
    """method -> the Run of every answer.run call bench made for it, in order."""
    seen = {}
    real = answer.run

    def spy(loaded, clip, question, cfg, *args, **kwargs):
        done = real(loaded, clip, question, cfg, *args, **kwargs)
        seen.setdefault(cfg.method, []).append(done)
        return done

    monkeypatch.setattr(answer, "run", spy)
    return seen


def test_a_rows_numbers_are_the_pipelines(tiny, passes):
    warmup, iters, tokens = 1, 3, 5
    result = bench.run(tiny, make_clip(seed=4), "what happens?", PruneConfig(), ["none", "sharp"], [0.25],
                       warmup=warmup, iters=iters, decode_tokens=tokens, max_pixels=PIXELS)
    rows = {r["method"]: r for r in result["rows"]}
    for method in ("none", "sharp"):
        row, runs = rows[method], passes[method]
        assert len(runs) == warmup + iters
        timed = runs[warmup:]

        def median(values):
            return sorted(values)[len(values) // 2]  # iters is odd: the middle pass

        assert row["e2e_seconds"] == median([r.seconds for r in timed])
        assert row["prefill_seconds"] == median([r.prefill.seconds for r in timed])
        assert row["vision_seconds"] == median([r.vision_seconds for r in timed])
        assert row["decode_seconds"] == median([r.decoded.seconds for r in timed])
        last = timed[-1]
        assert row["tokens"] == last.tokens and len(row["tokens"]) == tokens  # EOS ignored: every row as long
        assert row["visual_tokens_kept"] == (last.prefill.kept.numel() if method == "sharp"
                                             else last.encoded.layout.num_visual)
        assert row["tokens_after_pruning"] == last.prefill.kept_len
        assert row["kv_cache_bytes"] == last.prefill.kv_cache_bytes
    assert rows["sharp"]["layer"] == 2 and rows["sharp"]["visual_tokens_kept"] < rows["none"]["visual_tokens_kept"]


def test_a_stock_row_agrees_when_it_says_the_answer_before_the_eos_it_was_held_from():
    """generate() runs with min_new_tokens (a fixed count to time), so it cannot stop where the answer
    ends: sharp-tiny answers [64, EOS] and generate() [64, 47, ...]. That is agreement; a different
    token before the EOS is not (the reference here is the `none` row, sharp's own decode)."""
    import json

    from conftest import sharp

    result = sharp("bench", "-m", "sharp-tiny", "--iters", "1", "--warmup", "0", "--decode-tokens", "4",
                   "--methods", "transformers,none", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    eos = rows["none"]["tokens"][1]
    assert rows["none"]["tokens"][0] == rows["transformers"]["tokens"][0]
    assert eos not in rows["transformers"]["tokens"]  # held back: the case this test is about
    assert rows["transformers"]["tokens_agree"] is True and rows["none"]["tokens_agree"] is True
    ref = rows["none"]["tokens"]
    assert bench.answers_agree([ref[0] + 1, 47, 47, 47], ref, {eos}, forced=True) is False
    assert bench.answers_agree([ref[0], 47, 47, 47], ref, {eos}, forced=False) is False  # a sharp row must stop

"""`sharp eval` end to end: seeds per cell, the tie audit and skipped seeds, resuming, and needle
recall@k on sharp-tiny with a clip whose needle tokens are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.evaluate import runner, synth
from sharp_cli.evaluate.items import Item

cli = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", "12544", "--ratio", "0.5"]


def sharp(*args):
    return cli.invoke(app, [str(a) for a in args])


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def items3(tmp_path_factory):
    return synth.write(tmp_path_factory.mktemp("synth"), 3, seed=0, frames=16, size=64)


def _spy(monkeypatch, ties=None):
    """Wrap answer.ask: record (method, ratio, seed, tokens, kept) of every call; with `ties`
    (method, item index -> tie share), put a tie audit into the prune session's details, as the
    selection reports it."""
    import torch

    from sharp_cli import answer

    calls = []
    real = answer.ask

    def ask(loaded, clip, prompt, cfg, **kw):
        out = real(loaded, clip, prompt, cfg, **kw)
        kept = out.prefill.kept
        calls.append((cfg.method, cfg.ratio, cfg.seed, kw["max_new_tokens"],
                      None if kept is None else kept.tolist(), clip.path))
        if ties is not None and out.prefill.session is not None and cfg.method in ("fastv", "sharp"):
            out.prefill.session.details["tie_share"] = torch.tensor(ties(cfg.method, clip.path))
        return out

    monkeypatch.setattr(answer, "ask", ask)
    return calls


def test_every_cell_runs_under_its_seeds_and_resumes_by_seed(model_dirs, items3, tmp_path, monkeypatch):
    calls = _spy(monkeypatch, ties=lambda method, path: 0.5)  # tied everywhere: no later seed is skipped
    out = tmp_path / "r.jsonl"
    args = ("eval", items3, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--limit", 2, "-o", out, "--tie-seeds", 2)
    result = sharp(*args, "--random-seeds", 3, "--json")
    assert result.exit_code == 0, result.stderr
    answered = [(m, s) for m, _, s, tokens, _, _ in calls if tokens > 1]
    per_item = [("none", 0), ("fastv", 0), ("random", 0), ("random", 1), ("random", 2), ("sharp", 0)]
    # first every item's first seeds, then the later seeds (every cell tied: none is skipped), each
    # item redoing one unpruned prefill (1 token) for the agreement of its later answers
    assert answered == per_item * 2 + [("fastv", 1), ("sharp", 1)] * 2
    assert [(m, tokens) for m, _, _, tokens, _, _ in calls[12:15]] == [("none", 1), ("fastv", 8), ("sharp", 8)]
    records = _lines(out)
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(answered)
    assert all(r.get("first_token_kl") is not None for r in records if r["method"] != "none")
    data = json.loads(result.stdout)
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["random"]["seeds"] == [0, 1, 2] and rows["fastv"]["seeds"] == [0, 1] and rows["none"]["seeds"] == [0]
    assert rows["sharp"]["accuracy"] == pytest.approx(np.mean(list(rows["sharp"]["accuracy_by_seed"].values())))
    assert rows["sharp"]["tie_share"] == pytest.approx(0.5) and "seed" not in data["settings"]["options"]
    assert data["seeds"] == {"first": 0, "tie": 2, "random": 3} and data["bootstrap"]["resamples"] == 2000
    assert rows["sharp"]["vs_fastv"]["questions"] == 2 and rows["fastv"]["vs_none"]["questions"] == 2
    del calls[:]
    again = sharp(*args[:-2], "--tie-seeds", 3, "--random-seeds", 3, "-q")
    assert again.exit_code == 0, again.stderr
    assert [(m, s) for m, _, s, tokens, _, _ in calls if tokens > 1] == [("fastv", 2), ("sharp", 2)] * 2


def test_untied_cells_skip_their_later_seeds_and_ties_warn(model_dirs, items3, tmp_path, monkeypatch):
    """fastv ties nothing anywhere: seeds 1-2 skipped. sharp ties 30% of its kept tokens on one of
    three items: every seed runs, and its mean tie share (10%) is above 5%: one warning line."""
    monkeypatch.delenv("COLUMNS", raising=False)
    calls = _spy(monkeypatch, ties=lambda method, path: 0.3 if method == "sharp" and "colour" in path else 0.0)
    out = tmp_path / "r.jsonl"
    result = sharp("eval", items3, "-m", model_dirs["qwen2.5-vl"], *SMALL, "-o", out, "--methods",
                   "none,fastv,sharp", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted({(m, s) for m, _, s, tokens, _, _ in calls if tokens > 1}) == [
        ("fastv", 0), ("none", 0), ("sharp", 0), ("sharp", 1), ("sharp", 2)]
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    assert (rows["fastv"]["seeds"], rows["fastv"]["seeds_skipped"], rows["fastv"]["tie_share"]) == ([0], 2, 0.0)
    assert rows["sharp"]["seeds"] == [0, 1, 2] and rows["sharp"]["tie_share"] == pytest.approx(0.1)
    assert {r["tie_share"] for r in _lines(out) if r["method"] == "sharp"} == {0.0, 0.3}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "sharp 0.5 10%" in warnings[0] and "fastv" not in warnings[0]
    assert "1 (2 skipped)" in result.stderr
    # stderr is not a terminal here: the table folds to 80 columns, nothing cut (the warning is one line)
    assert max(len(line) for line in result.stderr.splitlines() if line not in warnings) <= 80
    assert "…" not in result.stderr
    assert "vs fastv" in result.stderr and "ties" in result.stderr


def test_sharded_runs_answer_every_seed(tmp_path):
    """A rank sees only its items' ties, so sharded runs never skip (every rank's lines are awaited)."""
    items = [Item(f"q{i}", "/v.mp4", "q", ["a", "b"], "A") for i in range(2)]
    cells = runner.plan_cells(["fastv"], [0.5], tie_seeds=2)
    for world, expected in ((1, []), (2, [("q0", [("fastv", 0.5, 1)])])):
        job = runner.Job(items, cells, None, tmp_path / f"r{world}.jsonl", {"s": 1}, {}, 8, 0, world)
        path = job.output
        path.write_text("".join(json.dumps({"item": i.id, "method": "fastv", "ratio": 0.5, "seed": 0,
                                            "tie_share": 0.0, "settings": {"s": 1}}) + "\n" for i in items))
        assert [(item.id, c) for item, c in runner.pending(job, later=True)] == expected


def test_results_without_seeds_are_refused_in_one_line(model_dirs, items3, tmp_path):
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"item": "colour-0000", "method": "none", "ratio": 1.0, "settings": {}}) + "\n")
    result = sharp("eval", items3, "-m", model_dirs["qwen2.5-vl"], *SMALL, "-o", out)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "written by an older sharp eval" in lines[0]
    assert "no tie seed" in lines[0] and out.read_text().count("\n") == 1  # nothing of the file touched


def test_resume_with_other_settings_names_the_difference(model_dirs, items3, tmp_path):
    out = tmp_path / "r.jsonl"
    args = ("eval", items3, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none", "-o", out, "--limit", 1)
    assert sharp(*args, "--layer", 2, "-q").exit_code == 0
    result = sharp(*args, "--layer", 3, "-q")
    assert result.exit_code == 2 and "(layer: 2 there, 3 now)" in result.stderr


# -- needle recall@k on sharp-tiny ------------------------------------------------------------------
@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """A 32-frame 128x128 clip: flat grey, a red 11-px square at x, y 40..50 on frames 5 and 6 only."""
    root = tmp_path_factory.mktemp("flash")
    clip = np.full((32, 128, 128, 3), 120, np.uint8)
    box = [40, 40, 51, 51]
    clip[5:7, 40:51, 40:51] = (220, 30, 30)
    (root / "videos").mkdir()
    synth.write_mp4(clip, root / "videos" / "flash.mp4", 8.0)
    item = {"id": "flash", "video": "videos/flash.mp4", "question": "What colour is the flash?",
            "options": ["red", "blue", "green", "pink"], "answer": "A", "needle_boxes": [[5, *box], [6, *box]]}
    (root / "items.jsonl").write_text(json.dumps(item) + "\n")
    return root / "items.jsonl"


@pytest.mark.parametrize("args, needle", [
    # 32 of 32 frames, 112x112: 16 token frames of 4x4; frames 5, 6 -> token frames 2, 3; row, column 1
    (["--frames", "32"], {37, 53}),
    # 16 frames sampled (1, 3, 5, ...): frame 5 is the 3rd, token frame 1; frame 6 is not seen
    (["--frames", "16"], {21}),
    # decoded at 64x64, resized to 84x84 (at least --max-pixels, in 28-px cells): 3x3 tokens per token
    # frame, 42.7 clip pixels each; x, y 40..50 cross the first cell edge: rows and columns 0-1
    (["--frames", "32", "--max-pixels", "4096"], {18, 19, 21, 22, 27, 28, 30, 31}),
])
def test_needle_recall_on_sharp_tiny(flash, tmp_path, monkeypatch, args, needle):
    calls = _spy(monkeypatch)
    result = sharp("eval", flash, "-m", "sharp-tiny", *args, "--methods", "none,fastv,random", "--ratio", 0.25,
                   "--tie-seeds", 1, "--random-seeds", 2, "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    kept = {(m, s): k for m, _, s, tokens, k, _ in calls if tokens > 1}
    for record in _lines(tmp_path / "r.jsonl"):
        assert record["needle_tokens"] == len(needle)
        got = kept[(record["method"], record["seed"])]
        assert record["needle_kept"] == (len(needle) if got is None else len(needle & set(got)))
    rows = {r["method"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["none"]["needle_recall"] == 1.0
    expected = np.mean([len(needle & set(kept[("random", s)])) / len(needle) for s in (0, 1)])
    assert rows["random"]["needle_recall"] == pytest.approx(expected) and rows["random"]["needle_answers"] == 2
    assert "recall@k" in result.stderr

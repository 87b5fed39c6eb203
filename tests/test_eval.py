"""`sharp eval` and `sharp synth`: letters, format readers, synthetic set, runner, resume, shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sharp_cli import jsonl
from sharp_cli.cli import app
from sharp_cli.errors import SharpError, UsageError
from sharp_cli.evaluate import formats, runner, summary, synth
from sharp_cli.evaluate.letters import INSTRUCTION, build_prompt, parse_letter, strip_letter_prefixes
from sharp_cli.evaluate.records import prompt_for
from videos import make_video

cli = CliRunner()
SMALL = ["--tie-seeds", "1", "--random-seeds", "1", "--frames", "8", "--max-pixels", "12544", "--ratio", "0.5"]
CELLS = [("none", 1.0), ("fastv", 0.5), ("random", 0.5), ("sharp", 0.5)]


def sharp(*args):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synth_items(tmp_path_factory):
    return synth.write(tmp_path_factory.mktemp("synth"), 3, seed=0, frames=16, size=64)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _answers(path) -> list[tuple]:
    """What a results file says, without timings."""
    return [(r["item"], r["method"], r["ratio"], r["output"], r["prediction"], r["visual_tokens_kept"])
            for r in _lines(path)]


# -- letters ---------------------------------------------------------------------------------------
OPTIONS = ["red", "blue", "dark green", "green"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("[C]", "C"), ("**D**", "D"), ("(C", "C"),
    (" B\n", "B"), ("B. blue", "B"), ("b) red", "B"), ("C: dark green", "C"), ("(A) red", "A"),
    ("The answer is B", "B"), ("The answer is (C).", "C"), ("Answer: d", "D"), ("The best answer is: A.", "A"),
    ("option C", "C"), ("I think the correct choice is B.", "B"), ("answer is a", "A"),
    ("blue", "B"), ("Blue.", "B"), ("It is dark green.", "C"), ("green", "D"), ("The square is red", "A"),
    ("I think B is right", "B"), ("A is correct", "A"),
    ("A nice one", None), ("the answer is a cat", None), ("A or B", None), ("green or blue", None),
    ("E", None), ("The answer is E", None), ("", None), ("   ", None), (None, None), ("I am not sure", None),
    ("e.g. nothing", None), ("w424 seven w424", None),
])
def test_parse_letter(text, expected):
    assert parse_letter(text, OPTIONS) == expected


def test_parse_letter_with_a_count_of_options_only():
    assert parse_letter("The answer is C", 4) == "C" and parse_letter("blue", 4) is None
    assert parse_letter("C", 2) is None and parse_letter("B", 2) == "B"


def test_parse_letter_longest_option_text_wins():
    assert parse_letter("dark green", ["green", "dark green", "red"]) == "B"
    assert parse_letter("There are 3 flashes.", ["1", "2", "3", "4"]) == "C"


TEMPLATES = ["{L}", "({L})", "{L}.", "{l}", "**{L}**", "The answer is {L}.", "Answer: ({l})", "{L}. {text}",
             "{l}) {text}", "({L}) {text}", "Option {L}", "The correct answer is {L}, {text}.", "{text}",
             "I think it is {text}."]
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=9)


@settings(max_examples=200, deadline=None)
@given(options=st.lists(words, min_size=2, max_size=8, unique=True), pick=st.integers(0, 7),
       template=st.sampled_from(TEMPLATES))
def test_parse_letter_reads_back_every_template(options, pick, template):
    i = pick % len(options)
    if template.count("{text}") and any(w in ("answer", "option", "choice", "the", "correct") for w in options):
        return  # option texts that are the template's own words are ambiguous by design
    text = template.format(L="ABCDEFGH"[i], l="abcdefgh"[i], text=options[i])
    assert parse_letter(text, options) == "ABCDEFGH"[i]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80), count=st.integers(0, 30))
def test_parse_letter_never_fails_and_stays_in_range(text, count):
    found = parse_letter(text, count)
    assert found is None or found in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:count]


def test_prompt_layout():
    assert build_prompt(" What colour? ", ["red", "blue"]) == f"What colour?\nA. red\nB. blue\n{INSTRUCTION}"
    assert INSTRUCTION == "Answer with the option's letter from the given choices directly."
    with pytest.raises(ValueError):
        build_prompt("q", ["only one"])


def test_strip_letter_prefixes():
    assert strip_letter_prefixes(["A. red", "B. blue", "(C) green"]) == ["red", "blue", "green"]
    assert strip_letter_prefixes(["A. red", "C. blue"]) == ["A. red", "C. blue"]  # not lettered in order
    assert strip_letter_prefixes(["Apple", "Banana"]) == ["Apple", "Banana"]


# -- format readers (hand-written samples in each layout) ------------------------------------------
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_our_format_json_and_jsonl(tmp_path):
    _touch(tmp_path / "clips" / "a.mp4")
    records = [
        {"video": "clips/a.mp4", "question": "Colour?", "options": ["red", "blue", "green"], "answer": "b",
         "category": "colour"},
        {"video": "clips/a.mp4", "question": "Which?", "options": ["A. one", "B. two"], "answer": "two", "id": "x"},
        {"video": "clips/a.mp4", "question": "Index?", "options": ["p", "q", "r", "s"], "answer": 3},
    ]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    for name in ("qa.json", "qa.jsonl"):
        data = formats.load(tmp_path / name)
        assert data.format == "sharp" and [i.id for i in data.items] == ["0", "x", "2"]
        first, second, third = data.items
        assert first.video == str(tmp_path / "clips" / "a.mp4") and first.answer == "B" and first.category == "colour"
        assert second.options == ["one", "two"] and second.answer == "B" and second.category is None
        assert third.answer == "D"
    other = tmp_path / "elsewhere"
    _touch(other / "clips" / "a.mp4")
    assert formats.load(tmp_path / "qa.json", video_dir=str(other)).items[0].video == str(other / "clips" / "a.mp4")


@pytest.mark.parametrize("record, message", [
    ({"video": "v.mp4", "question": "q", "options": ["a", "b"], "answer": "C"}, "neither an option letter"),
    ({"video": "v.mp4", "question": "q", "options": ["a", "b"], "answer": 5}, "out of range"),
    ({"video": "v.mp4", "question": "q", "answer": "A"}, "an answer needs options"),
    ({"video": "v.mp4", "question": "q", "options": ["a"], "answer": "A"}, "2 to 26 options"),
    ({"video": "v.mp4", "question": " ", "options": ["a", "b"], "answer": "A"}, "question is empty"),
])
def test_our_format_errors_name_the_item(tmp_path, record, message):
    (tmp_path / "qa.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(SharpError, match=message):
        formats.load(tmp_path / "qa.jsonl", "sharp")


def test_our_format_without_answer_or_options(tmp_path):
    """Agreement needs no labels: such questions are read, with no answer (and no options)."""
    _touch(tmp_path / "a.mp4")
    labelled = {"video": "a.mp4", "question": "Colour?", "options": ["red", "blue"]}
    (tmp_path / "qa.jsonl").write_text(json.dumps({"video": "a.mp4", "question": "What happens?"}) + "\n"
                                       + json.dumps(labelled))
    open_q, unlabelled = formats.load(tmp_path / "qa.jsonl").items
    assert (open_q.options, open_q.answer, unlabelled.options, unlabelled.answer) == ([], None, ["red", "blue"], None)
    assert prompt_for(open_q) == "What happens?" and INSTRUCTION in prompt_for(unlabelled)


def test_duplicate_ids_and_unknown_layouts(tmp_path):
    rec = {"id": "same", "video": "v.mp4", "question": "q", "options": ["a", "b"], "answer": "A"}
    (tmp_path / "qa.json").write_text(json.dumps([rec, rec]))
    with pytest.raises(SharpError, match="appears twice"):
        formats.load(tmp_path / "qa.json")
    (tmp_path / "odd.json").write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(UsageError, match="cannot tell the format"):
        formats.load(tmp_path / "odd.json")
    with pytest.raises(UsageError, match="--format must be"):
        formats.load(tmp_path / "qa.json", "vqa")


def _videomme(root: Path) -> Path:
    records = [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
         "url": "https://example.invalid/v1", "videoID": "vid_one", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many planets are shown?",
         "options": ["A. Three.", "B. Four.", "C. Five.", "D. Six."], "answer": "C"},
        {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "Tennis",
         "url": "https://example.invalid/v2", "videoID": "vid_two", "question_id": "002-1",
         "task_type": "Action Recognition", "question": "What does the player do last?",
         "options": ["A. Serves.", "B. Waves.", "C. Sits down.", "D. Jumps."], "answer": "A"},
    ]
    _touch(root / "data" / "vid_one.mp4")
    _touch(root / "data" / "vid_two.mkv")
    ann = root / "videomme" / "test.jsonl"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ann


def test_videomme_reader(tmp_path):
    data = formats.load(_videomme(tmp_path))
    assert data.format == "videomme" and [i.id for i in data.items] == ["001-1", "002-1"]
    one, two = data.items
    assert one.video == str(tmp_path / "data" / "vid_one.mp4") and two.video.endswith("vid_two.mkv")
    assert one.options == ["Three.", "Four.", "Five.", "Six."] and one.answer == "C" and one.category == "short"
    by_task = formats.load(tmp_path / "videomme" / "test.jsonl", "videomme", category_field="task_type")
    assert by_task.items[1].category == "Action Recognition"


def test_videomme_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    ann = _videomme(tmp_path)
    pq.write_table(pa.Table.from_pylist(_lines(ann)), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    ann.unlink()
    data = formats.load(tmp_path)  # the folder: auto-detected from videomme/*.parquet
    assert data.format == "videomme" and data.items[0].answer == "C" and data.items[0].options[0] == "Three."


def test_mvbench_reader(tmp_path):
    tasks = {
        "action_antonym": [{"video": "clip_1.webm", "question": "What is the action?",
                            "candidates": ["pulling a mug", "pushing a mug", "not sure"], "answer": "pushing a mug"}],
        "action_sequence": [{"video": "ABC12.mp4", "question": "What did the person do first?",
                             "candidates": ["Sat down.", "Opened a door.", "Took a cup.", "Ate food."],
                             "answer": "Took a cup.", "start": 3.5, "end": 9.0}],
        "episodic_reasoning": [{"video": "frames/s01", "question": "Why?", "candidates": ["a", "b"], "answer": "a"}],
    }
    for stem, records in tasks.items():
        path = tmp_path / "json" / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
    _touch(tmp_path / "video" / "ssv2_video" / "clip_1.webm")
    _touch(tmp_path / "video" / "data0613" / "star" / "Charades_v1_480" / "ABC12.mp4")
    (tmp_path / "video" / "tvqa" / "frames_fps3_hq" / "frames" / "s01").mkdir(parents=True)  # frames, not a video
    data = formats.load(tmp_path)
    assert data.format == "mvbench"
    antonym, sequence = data.items
    assert (antonym.id, antonym.answer, antonym.category) == ("action_antonym-0", "B", "Action Antonym")
    assert antonym.video == str(tmp_path / "video" / "ssv2_video" / "clip_1.webm")
    assert sequence.answer == "C" and "data0613" in sequence.video
    assert any("frame folders" in n for n in data.notes) and any("Action Sequence" in n for n in data.notes)
    assert formats.load(tmp_path / "json").format == "mvbench"  # its json/ folder works too
    single = formats.load(tmp_path / "json" / "action_antonym.json", "mvbench")
    assert [i.id for i in single.items] == ["action_antonym-0"] and single.items[0].video == antonym.video


def test_mlvu_reader(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "1_plotQA.json").write_text(json.dumps([
        {"video": "movie_a.mp4", "duration": 512.0, "question": "Who opens the box?",
         "candidates": ["The cook", "The pilot", "The child", "The dog"], "answer": "The child",
         "question_type": "plotQA"}]))
    (tmp_path / "json" / "9_summary.json").write_text(json.dumps([
        {"video": "doc_b.mp4", "duration": 900.0, "question": "Summarise the video.", "answer": "Long text.",
         "question_type": "summary"}]))
    _touch(tmp_path / "video" / "1_plotQA" / "movie_a.mp4")
    data = formats.load(tmp_path)
    assert data.format == "mlvu" and len(data.items) == 1
    assert formats.load(tmp_path / "json" / "1_plotQA.json").format == "mlvu"
    item = data.items[0]
    assert (item.id, item.answer, item.category) == ("1_plotQA-0", "C", "plotQA")
    assert item.video == str(tmp_path / "video" / "1_plotQA" / "movie_a.mp4")
    assert any("without candidates" in n for n in data.notes)


def test_longvideobench_reader(tmp_path):
    (tmp_path / "lvb_val.json").write_text(json.dumps([
        {"video_id": "abc", "question": "What colour is the car when the man waves?",
         "candidates": ["white", "red", "black", "blue", "green"], "correct_choice": 3, "video_path": "abc.mp4",
         "duration_group": 600, "question_category": "E2O", "id": "abc_0"},
        {"video_id": "def", "question": "Hidden?", "candidates": ["x", "y"], "video_path": "def.mp4",
         "duration_group": 15, "question_category": "S2E", "id": "def_0"},
    ]))
    _touch(tmp_path / "videos" / "abc.mp4")
    data = formats.load(tmp_path)
    assert data.format == "longvideobench" and len(data.items) == 2
    item, unlabelled = data.items
    assert (item.id, item.answer, item.category, len(item.options)) == ("abc_0", "D", "180s-600s", 5)
    assert item.video == str(tmp_path / "videos" / "abc.mp4")
    assert (unlabelled.answer, unlabelled.options, unlabelled.category) == (None, ["x", "y"], "8s-15s")
    assert any("1 of 2 questions have no correct_choice" in n for n in data.notes)
    assert formats.load(tmp_path, category_field="question_category").items[0].category == "E2O"


def test_missing_videos_fail_or_are_skipped(tmp_path):
    _touch(tmp_path / "here.mp4")
    recs = [{"video": v, "question": "q", "options": ["a", "b"], "answer": "A"} for v in ("here.mp4", "gone.mp4")]
    (tmp_path / "qa.json").write_text(json.dumps(recs))
    data = formats.load(tmp_path / "qa.json")
    with pytest.raises(SharpError, match="1 of 2 videos not found.*gone.mp4"):
        formats.drop_missing(data, skip=False)
    kept = formats.drop_missing(data, skip=True)
    assert [i.id for i in kept.items] == ["0"] and "skipped 1" in kept.notes[-1]


# -- the synthetic set -----------------------------------------------------------------------------
def test_synth_is_deterministic_and_balanced(tmp_path):
    a = synth.write(tmp_path / "a", 8, seed=5, frames=16, size=64)
    b = synth.write(tmp_path / "b", 8, seed=5, frames=16, size=64)
    c = synth.write(tmp_path / "c", 8, seed=6, frames=16, size=64)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    items = _lines(a)
    for item in items:
        assert (a.parent / item["video"]).read_bytes() == (b.parent / item["video"]).read_bytes()
        assert len(item["options"]) == 4 and item["category"] == item["id"].split("-")[0]
    for task in synth.BASIC:  # 2 questions per task: two different letters each
        letters = [i["answer"] for i in items if i["category"] == task]
        assert len(letters) == 2 and len(set(letters)) == 2
    loaded = formats.load(a)  # our own format reads it back
    assert [i.answer for i in loaded.items] == [i["answer"] for i in items]


def _colour_frames(clip, rgb) -> list[int]:
    return [t for t, f in enumerate(clip) if (np.abs(f.astype(int) - rgb).sum(axis=2) < 30).any()]


@pytest.mark.parametrize("target", range(4))
def test_synth_answers_match_the_pixels(target):
    rng = lambda: np.random.default_rng([1, target])  # noqa: E731
    clip, _, shown, wrong, boxes = synth.BUILDERS["colour"](rng(), 32, 128, target)
    flashes = _colour_frames(clip, synth.PALETTE[shown])
    assert len(flashes) == 2 and flashes[0] % 4 == 1 and flashes[1] == flashes[0] + 1
    assert [b[0] for b in boxes] == flashes  # needle boxes: the flash's frames and pixels
    for t, x0, y0, x1, y1 in boxes:
        assert x1 > x0 and y1 > y0 and (clip[t, y0:y1, x0:x1] == synth.PALETTE[shown]).all()
    assert len(_colour_frames(clip, synth.PALETTE[wrong[0]])) == 32  # the static distractor
    clip, _, first, wrong, _ = synth.BUILDERS["order"](rng(), 32, 128, target)
    assert max(_colour_frames(clip, synth.PALETTE[first])) < min(_colour_frames(clip, synth.PALETTE[wrong[0]]))
    clip, question, way, _, boxes = synth.BUILDERS["direction"](rng(), 32, 128, target)
    assert [b[0] for b in boxes] == list(range(32))  # the mover is the needle on every frame
    mover = synth.PALETTE[question.split()[-3]]
    ys, xs = zip(*[np.argwhere((np.abs(f.astype(int) - mover).sum(axis=2) < 30)).mean(axis=0) for f in clip])
    moved = {"left": xs[0] - xs[-1], "right": xs[-1] - xs[0], "up": ys[0] - ys[-1], "down": ys[-1] - ys[0]}
    assert moved[way] > 40 and max(moved.values()) == moved[way]
    clip, _, count, wrong, boxes = synth.BUILDERS["count"](rng(), 32, 128, target)
    changed = [t for t, f in enumerate(clip) if (f != clip[0]).any()]  # frame 0 never flashes
    assert sorted([*wrong, count]).index(count) == target and len(changed) == 2 * count
    assert sorted(b[0] for b in boxes) == changed


def test_synth_command(tmp_path):
    result = sharp("synth", tmp_path / "s", "--n", 2, "--seed", 3, "--frames", 8, "--size", 64, "--tasks", "count")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "s" / "items.jsonl")
    assert [i["category"] for i in _lines(tmp_path / "s" / "items.jsonl")] == ["count", "count"]
    bad = sharp("synth", tmp_path / "t", "--tasks", "colour,smell")
    assert bad.exit_code == 2 and "unknown task 'smell'" in bad.stderr


# -- the runner ------------------------------------------------------------------------------------
def test_summary_accuracy_relative_and_categories():
    items = [formats.Item(str(i), "/v.mp4", "q", ["a", "b"], "A", "x" if i < 2 else "y") for i in range(4)]
    cells = [("none", 1.0, 0), ("sharp", 0.5, 0)]

    def rec(i, method, ratio, correct, **extra):
        return {"item": str(i), "method": method, "ratio": ratio, "seed": 0, "correct": correct,
                "category": items[i].category,
                "prediction": "A" if correct else None, "prefill_seconds": 0.5 if method == "none" else 0.25,
                "visual_tokens_kept": 100 if method == "none" else 50, "visual_tokens_total": 100, **extra}

    records = [rec(i, "none", 1.0, i != 3) for i in range(4)] + [rec(i, "sharp", 0.5, i == 0) for i in range(3)]
    records.append({"item": "3", "method": "sharp", "ratio": 0.5, "seed": 0, "correct": False, "category": "y",
                    "prediction": None, "error": "cannot read video"})
    records.append(rec(0, "none", 1.0, False))  # a duplicate line: the first one counts
    none, pruned = summary.summarize(records, items, cells)
    assert none["accuracy"] == 0.75 and none["relative_accuracy"] == 1.0 and none["categories"] == {"x": 1.0, "y": 0.5}
    assert pruned["accuracy"] == 0.25 and pruned["relative_accuracy"] == pytest.approx(1 / 3)
    assert pruned["errors"] == 1 and pruned["unparsed"] == 2 and pruned["questions"] == 4
    assert pruned["prefill_seconds"] == 0.25 and pruned["visual_tokens_kept"] == 50
    assert runner.plan_cells(["sharp", "none"], [0.1, 0.2]) == [("none", 1.0, 0), ("sharp", 0.1, 0), ("sharp", 0.2, 0)]
    assert runner.plan_cells(["sharp", "sharp"], [0.5, 0.50]) == [("sharp", 0.5, 0)]
    assert runner.plan_cells(["random", "none", "fastv"], [0.5], tie_seeds=2, random_seeds=3, first_seed=7) == [
        ("none", 1.0, 0), ("random", 0.5, 7), ("random", 0.5, 8), ("random", 0.5, 9), ("fastv", 0.5, 7),
        ("fastv", 0.5, 8)]


def test_half_written_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"item": "1", "method": "none", "ratio": 1.0, "seed": 0}\nnot json\n{"item": "2", "meth')
    assert [r["item"] for r in runner.read_results(path)] == ["1"]
    with jsonl.open_for_append(path) as handle:
        jsonl.append(handle, {"item": "3", "method": "none", "ratio": 1.0, "seed": 0})
    assert [r["item"] for r in runner.read_results(path)] == ["1", "3"] and path.read_text().endswith("\n")


# -- sharp eval end to end (tiny random model) ------------------------------------------------------
def test_eval_end_to_end_json_and_table(model_dirs, synth_items, tmp_path):
    out = tmp_path / "r.jsonl"
    result = sharp("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(r["method"], r["ratio"]) for r in data["rows"]] == CELLS
    for row in data["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["questions"] == 3 and row["errors"] == 0
        assert set(row["categories"]) == {"colour", "direction", "order"}
        assert row["visual_tokens_kept"] == (row["visual_tokens_total"] * row["ratio"])
    assert data["format"] == "sharp" and data["results_file"] == str(out)
    records = _lines(out)
    assert len(records) == 12 and len({runner.line_key(r) for r in records}) == 12
    assert all(r["correct"] == (r["prediction"] == r["answer"]) for r in records)
    assert "sharp eval" in result.stderr and "fastv" in result.stderr


def test_eval_with_compile_gives_the_uncompiled_answers(model_dirs, synth_items, tmp_path):
    """--compile (the vision blocks and decode steps through torch.compile, here on the CPU) goes
    through dynamo and changes no answer."""
    from torch._dynamo.utils import counters

    answers, traced = {}, {}
    for flag in ([], ["--compile"]):
        before = counters["frames"]["total"]
        out = tmp_path / f"r{len(flag)}.jsonl"
        result = sharp("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,sharp",
                       "--limit", 2, "-o", out, "-q", *flag)
        assert result.exit_code == 0, result.stderr
        answers[bool(flag)] = {runner.line_key(r): (r["output"], r["first_token"]) for r in _lines(out)}
        traced[bool(flag)] = counters["frames"]["total"] > before
    assert answers[True] == answers[False] and len(answers[True]) == 4
    assert traced == {False: False, True: True}


def test_resume_after_limit_and_a_half_written_line(model_dirs, synth_items, tmp_path, monkeypatch):
    from sharp_cli import answer

    calls = []
    real_ask = answer.ask
    monkeypatch.setattr(answer, "ask", lambda *a, **k: calls.append(a[3].method) or real_ask(*a, **k))
    out = tmp_path / "r.jsonl"
    args = ("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,sharp", "-o", out, "-q")
    assert sharp(*args, "--limit", 2).exit_code == 0
    assert len(calls) == 4 and len(_lines(out)) == 4
    result = sharp(*args, "--json")
    assert result.exit_code == 0 and len(calls) == 6  # only the third item's 2 answers
    assert {r["questions"] for r in json.loads(result.stdout)["rows"]} == {3}
    keys = [runner.line_key(r) for r in _lines(out)]
    assert len(keys) == len(set(keys)) == 6
    with open(out, "a") as fh:
        fh.write('{"item": "order-0002", "method": "sha')  # killed mid-write
    assert sharp(*args).exit_code == 0 and len(calls) == 6
    assert len(_lines(out)) == 6  # the unfinished line was cut off, nothing redone
    other = sharp(*args, "--frames", "4")
    assert other.exit_code == 2 and "other settings" in other.stderr and "frames" in other.stderr


def test_broken_video_is_recorded_as_an_error_in_the_default_results_file(model_dirs, tmp_path, monkeypatch):
    (tmp_path / "broken.mp4").write_text("not a video")
    (tmp_path / "qa.jsonl").write_text(json.dumps(
        {"video": "broken.mp4", "question": "q?", "options": ["a", "b"], "answer": "A"}) + "\n")
    monkeypatch.chdir(tmp_path)
    result = sharp("eval", "qa.jsonl", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["rows"][0]
    assert row["errors"] == 1 and row["accuracy"] == 0.0
    default = tmp_path / "sharp-eval-qa-qwen2.5-vl.jsonl"  # in the current folder, named after data and model
    assert json.loads(result.stdout)["results_file"] == str(default)
    assert "broken.mp4" in _lines(default)[0]["error"]


@pytest.mark.parametrize("batch", ["1", "2"])  # one at a time (runner.run), and together (together.run)
def test_a_failed_cell_is_recorded_and_answered_again_by_the_next_run(model_dirs, synth_items, tmp_path,
                                                                      monkeypatch, batch):
    """One cell running out of memory is an error line (counted wrong), not the end of the run; the
    next run answers that cell alone, and its answer replaces the error in the summary."""
    import torch

    from sharp_cli import answer as answer_mod

    real = answer_mod.prefill

    def fastv_out_of_memory(begun, *args, **kwargs):
        if begun.cfg.method == "fastv" and begun.cfg.ratio == 0.5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(begun, *args, **kwargs)

    out = tmp_path / "r.jsonl"
    args = ("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,fastv", "--limit", "2",
            "--max-batch", batch, "-o", out, "--json")
    monkeypatch.setattr(answer_mod, "prefill", fastv_out_of_memory)
    first = sharp(*args)
    assert first.exit_code == 0, first.stderr
    rows = {r["method"]: r for r in json.loads(first.stdout)["rows"]}
    assert rows["fastv"]["errors"] == 2 and rows["fastv"]["accuracy"] == 0.0 and rows["none"]["errors"] == 0
    failed = [r for r in _lines(out) if r.get("error")]
    assert len(failed) == 2 and all(r["retry"] and "out of GPU memory" in r["error"] for r in failed)
    assert {r["method"] for r in failed} == {"fastv"} and len(_lines(out)) == 4
    monkeypatch.setattr(answer_mod, "prefill", real)
    second = sharp(*args)
    assert second.exit_code == 0, second.stderr
    lines = _lines(out)
    assert len(lines) == 6 and [(r["method"], "error" in r) for r in lines[4:]] == [("fastv", False)] * 2
    rows = {r["method"]: r for r in json.loads(second.stdout)["rows"]}
    assert rows["fastv"]["errors"] == 0 and rows["fastv"]["questions"] == 2
    assert sharp(*args).exit_code == 0 and len(_lines(out)) == 6  # nothing left to answer


# -- agreement with the unpruned model ---------------------------------------------------------------
def test_first_token_kl_and_same_answer():
    import math

    import torch

    from sharp_cli.evaluate import agreement

    ref = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    assert agreement.first_token(ref, ref.clone()) == {"first_token_kl": 0.0, "first_token_agree": True}
    got = agreement.first_token(ref, torch.tensor([math.log(0.25), math.log(0.75)]))
    assert got["first_token_kl"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert not got["first_token_agree"]
    options = ["red", "blue"]
    assert agreement.same_answer({"output": "B"}, {"output": "B. blue"}, options)
    assert agreement.same_answer({"prediction": "A", "output": "A"}, {"prediction": None, "output": "red"}, options)
    assert not agreement.same_answer({"prediction": "A", "output": "A"}, {"prediction": "B", "output": "B"}, options)
    assert agreement.same_answer({"output": "A Cat  sits"}, {"output": "a cat sits"}) and not agreement.same_answer(
        {"output": "a cat"}, {"output": "a dog"})


def test_agreement_of_a_model_with_itself_is_total(model_dirs, synth_items, tmp_path):
    """fastv and every-component-off sharp at ratio 1 run the unpruned computation: 100%, KL 0."""
    result = sharp("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL[:-2], "--ratio", 1, "--methods",
                   "none,fastv,sharp", "--no-segment-mask", "--debias", "none", "--no-dedup",
                   "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    none, *pruned = json.loads(result.stdout)["rows"]
    assert none["answer_agreement"] is None and none["agreement_questions"] == 0
    for row in pruned:
        assert (row["agreement_questions"], row["answer_agreement"], row["first_token_agreement"]) == (3, 1.0, 1.0)
        assert row["first_token_kl"] == 0.0
    assert "agree" in result.stderr and "KL" in result.stderr
    records = [r for r in _lines(tmp_path / "r.jsonl") if r["method"] != "none"]
    assert len(records) == 6 and all(r["first_token_kl"] == 0.0 and r["first_token_agree"] for r in records)


def test_agreement_of_a_different_method_and_after_resuming(model_dirs, synth_items, tmp_path, monkeypatch):
    """Random pruning to 5% moves the first-token distribution; resuming a run that has only the
    unpruned answers redoes one unpruned prefill per item and stores the same figures as a fresh run."""
    from sharp_cli import answer

    model = model_dirs["qwen2.5-vl"]
    args = ("eval", synth_items, "-m", model, *SMALL[:-2], "--ratio", 0.05)
    fresh = sharp(*args, "--methods", "none,random", "-o", tmp_path / "fresh.jsonl", "--json")
    assert fresh.exit_code == 0, fresh.stderr
    row = json.loads(fresh.stdout)["rows"][1]
    assert row["first_token_kl"] > 1e-4 and row["agreement_questions"] == 3
    assert row["first_token_agreement"] < 1.0 or row["answer_agreement"] < 1.0
    calls = []
    real_ask = answer.ask
    monkeypatch.setattr(answer, "ask", lambda *a, **k: calls.append((a[3].method, k["max_new_tokens"]))
                        or real_ask(*a, **k))
    out = tmp_path / "resumed.jsonl"
    assert sharp(*args, "--methods", "none", "-o", out, "-q").exit_code == 0
    resumed = sharp(*args, "--methods", "none,random", "-o", out, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert calls[3:] == [("none", 1), ("random", 8)] * 3
    kl = lambda path: [(r["item"], round(r["first_token_kl"], 9), r["first_token_agree"])  # noqa: E731
                       for r in _lines(path) if r["method"] == "random"]
    assert kl(out) == kl(tmp_path / "fresh.jsonl")
    assert json.loads(resumed.stdout)["rows"][1] | {"prefill_seconds": 0} == row | {"prefill_seconds": 0}


def test_agreement_counts_questions_without_answers(model_dirs, synth_items, tmp_path):
    records = [json.loads(line) for line in Path(synth_items).read_text().splitlines()]
    videos = Path(synth_items).parent
    bare = [{"video": str(videos / r["video"]), "question": r["question"]} for r in records]
    (tmp_path / "open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    result = sharp("eval", tmp_path / "open.jsonl", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,sharp",
                   "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    none, pruned = json.loads(result.stdout)["rows"]
    assert none["accuracy"] is None and none["questions"] == 3 and pruned["agreement_questions"] == 3
    assert pruned["unparsed"] == 0 and 0.0 <= pruned["answer_agreement"] <= 1.0


@pytest.mark.parametrize("args, code, message", [
    (["--methods", "none,warp"], 2, "unknown method 'warp'"),
    (["--ratio", "0"], 2, "--ratio must be in (0, 1]"),
    (["--limit", "0"], 2, "--limit must be >= 1"),
    (["--format", "vqa"], 2, "--format must be"),
    (["--layer", "9"], 2, "--layer must be < 4"),
])
def test_eval_bad_arguments(model_dirs, synth_items, tmp_path, args, code, message):
    result = sharp("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "-o", tmp_path / "r.jsonl", *args)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharp: error:") and message in lines[0]


def test_eval_missing_data_and_videos(model_dirs, tmp_path):
    assert sharp("eval", tmp_path / "nothing.jsonl", "-m", model_dirs["qwen2.5-vl"]).exit_code == 2
    (tmp_path / "qa.jsonl").write_text(json.dumps(
        {"video": "gone.mp4", "question": "q?", "options": ["a", "b"], "answer": "A"}) + "\n")
    result = sharp("eval", tmp_path / "qa.jsonl", "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 1 and "videos not found" in result.stderr and "--video-dir" in result.stderr


# -- sharding --------------------------------------------------------------------------------------
def _job(tmp_path, world=2, rank=0):
    items = [formats.Item(f"q{i}", "/v.mp4", "q", ["a", "b"], "A") for i in range(3)]
    return runner.Job(items, [("none", 1.0, 0), ("sharp", 0.5, 0), ("sharp", 0.5, 1)], None, tmp_path / "r.jsonl",
                      {"s": 1}, {}, 8, rank, world)


def _write(path, job, item_ids, rank):
    with open(path, "a") as fh:
        for item in job.items:
            if item.id in item_ids:
                for method, ratio, seed in job.cells:
                    fh.write(json.dumps({"item": item.id, "method": method, "ratio": ratio, "seed": seed, "rank": rank,
                                         "settings": {"s": 1}}) + "\n")


def test_file_based_wait_and_merge_in_item_order(tmp_path):
    job = _job(tmp_path)
    assert [i.id for i in job.my_items] == ["q0", "q2"] and job.output.name == "r.jsonl.rank0"
    _write(runner.shard_path(job.results, 0), job, {"q0", "q2"}, 0)
    assert runner.wait_for_shards(job, timeout=0) == [1]  # rank 1 has written nothing yet
    _write(runner.shard_path(job.results, 1), job, {"q1"}, 1)
    assert runner.wait_for_shards(job, timeout=0) == []
    assert runner.merge(job) == 9
    assert [(r["item"], r["method"], r["seed"]) for r in _lines(job.results)] == [
        (f"q{i}", m, s) for i in range(3) for m, s in (("none", 0), ("sharp", 0), ("sharp", 1))]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # shards removed once merged
    assert runner.merge(job) == 0 and len(_lines(job.results)) == 9


def test_resume_reads_leftover_shards_and_refuses_other_settings(tmp_path):
    job = _job(tmp_path)
    _write(runner.shard_path(job.results, 1), job, {"q1"}, 1)
    single = _job(tmp_path, world=1)
    assert [(item.id, cells) for item, cells in runner.pending(single)] == [
        ("q0", single.cells[:2]), ("q2", single.cells[:2])]  # the first phase: every cell's first seed
    assert [(item.id, cells) for item, cells in runner.pending(single, later=True)] == [
        ("q0", single.cells[2:]), ("q2", single.cells[2:])]
    single.settings = {"s": 2}
    with pytest.raises(UsageError, match="other settings.*s: 1 there, 2 now"):
        runner.pending(single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_merge_to_the_single_process_result(model_dirs, synth_items, tmp_path):
    """Two real processes under a torchrun-style environment (gloo barrier) on the CPU."""
    import torch

    model = str(model_dirs["qwen2.5-vl"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SHARP_DEBUG="0", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "sharp_cli", "eval", str(synth_items), "-m", model, *SMALL,
           "-o", str(tmp_path / "sharded.jsonl"), "-q", "--shard-timeout", "120"]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (1, 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rank processes, so the arithmetic is the same
    try:
        single = sharp("eval", synth_items, "-m", model, *SMALL, "-o", tmp_path / "single.jsonl", "-q")
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.stderr
    for proc in ranks:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert _answers(tmp_path / "sharded.jsonl") == _answers(tmp_path / "single.jsonl")
    assert {r["rank"] for r in _lines(tmp_path / "sharded.jsonl")} == {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.jsonl", "single.jsonl"]  # shards merged, removed


def test_synth_task_names_agree_with_the_command():
    from sharp_cli.evaluate import commands

    assert commands.TASKS == synth.TASKS and commands.TASK_GROUPS == tuple(synth.GROUPS)


def test_help_lists_eval_and_synth_without_importing_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sharp_cli", "eval", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--video-dir" in out.stdout and "--shard-timeout" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "typer" in imported and "torch" not in imported and "numpy" not in imported
    result = sharp("--help")
    assert "eval" in result.stdout and "synth" in result.stdout


@pytest.fixture(scope="module")
def unicode_video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


def test_eval_output_refuses_a_file_that_is_not_ours_before_loading(model_dirs, unicode_video, tmp_path, monkeypatch):
    """`sharp eval -o` at a file that is not eval's results (here: its own questions) is one line,
    exit 2, before the model loads, and the file keeps every byte."""
    from sharp_cli import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", never)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "q1", "video": unicode_video, "question": "what?", "options": ["a", "b"],
                                 "answer": "A"}) + "\n")
    before = items.read_bytes()
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(before)
    result = cli.invoke(app, ["eval", str(items), "-m", str(model_dirs["qwen2.5-vl"]), "-o", str(copy)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "is not a results file of sharp's (line 1" in result.stderr
    assert copy.read_bytes() == before

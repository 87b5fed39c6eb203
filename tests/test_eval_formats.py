"""Eval's format readers (sharp_cli/evaluate/formats.py and readers/): hand-written samples of our
format, Video-MME, MVBench, MLVU and LongVideoBench; missing videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import read_jsonl
from sharp_cli.errors import SharpError, UsageError
from sharp_cli.evaluate import formats
from sharp_cli.evaluate.records import prompt_for
from sharp_cli.letters import INSTRUCTION


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
    pq.write_table(pa.Table.from_pylist(read_jsonl(ann)), tmp_path / "videomme" / "test-00000-of-00001.parquet")
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

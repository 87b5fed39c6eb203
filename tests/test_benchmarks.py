"""`sharp eval` on Video-MME, MVBench, MLVU and LongVideoBench as their users download them.

Every layout is laid out from records quoted in tests/benchmark_records.py; empty files or tiny
synthetic clips stand in for the videos. The reference prompts are compared with lmms-eval's text,
spelled out here from its task yaml and utils.py, not from sharp's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import benchmark_records as rec
from sharp_cli.cli import app
from sharp_cli.errors import SharpError
from sharp_cli.evaluate import formats, headline, prompts
from sharp_cli.evaluate.records import prompt_for

cli = CliRunner()
SMALL = ["--frames", "4", "--max-pixels", "12544", "--ratio", "0.5"]


def sharp(*args):
    return cli.invoke(app, [str(a) for a in args])


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _clip(path: Path) -> Path:
    from videos import make_video

    path.parent.mkdir(parents=True, exist_ok=True)
    make_video(path, n_frames=8, fps=4, size=(64, 48))
    return path


def _json(path: Path, records, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records))
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# -- 1. Video-MME as JSON in a folder named videomme ----------------------------------------------------
@pytest.mark.parametrize("name, lines", [("test.json", False), ("test.jsonl", True)])
def test_videomme_records_in_a_folder_named_videomme_find_the_videos_beside_them(tmp_path, name, lines):
    """/data/videomme/{test.json, data/}: lmms-eval's cache folder name, and the usual dataset root name."""
    root = tmp_path / "videomme"
    ann = _json(root / name, [rec.VIDEOMME_001_1], lines)
    _touch(root / "data" / "fFjv93ACGo8.mp4")
    for data in (ann, root):  # the file, or the folder with its one annotation file
        dataset = formats.drop_missing(formats.load(data), skip=False)
        item, = dataset.items
        assert dataset.format == "videomme" and item.video == str(root / "data" / "fFjv93ACGo8.mp4")
        assert (item.id, item.answer, item.category, item.options[2]) == ("001-1", "C", "short", "Berries.")


def test_videomme_parquet_keeps_its_videos_one_folder_up(tmp_path):
    """lmms-eval/Video-MME: videomme/test-*.parquet beside data/ (and lmms-eval accepts .MP4)."""
    _parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", [rec.VIDEOMME_001_1])
    _touch(tmp_path / "data" / "fFjv93ACGo8.MP4")
    for data in (tmp_path, tmp_path / "videomme", tmp_path / "videomme" / "test-00000-of-00001.parquet"):
        item, = formats.drop_missing(formats.load(data), skip=False).items
        assert item.video == str(tmp_path / "data" / "fFjv93ACGo8.MP4")


# -- 2. LongVideoBench's Hugging Face parquet ---------------------------------------------------------
def test_longvideobench_parquet_is_told_by_its_columns_and_read_from_option_columns(tmp_path):
    _parquet(tmp_path / "validation-00000-of-00001.parquet", [rec.lvb_parquet_row(rec.LVB_VAL_0)])
    _touch(tmp_path / "videos" / "86CxyhFV9MI.mp4")
    file = tmp_path / "validation-00000-of-00001.parquet"
    for data, fmt in ((tmp_path, "auto"), (file, "auto"), (file, "longvideobench")):
        dataset = formats.drop_missing(formats.load(data, fmt), skip=False)
        item, = dataset.items
        assert dataset.format == "longvideobench" and item.options == rec.LVB_VAL_0["candidates"]  # "N/A" dropped
        assert (item.id, item.answer, item.category) == ("86CxyhFV9MI_0", "B", "180s-600s")
        assert item.video == str(tmp_path / "videos" / "86CxyhFV9MI.mp4")
    assert formats.load(file, category_field="question_category").items[0].category == "TOS"


def test_longvideobench_folder_prefers_the_validation_questions(tmp_path):
    _json(tmp_path / "lvb_val.json", [rec.LVB_VAL_0])
    _json(tmp_path / "lvb_test_wo_gt.json", [rec.lvb_test(dict(rec.LVB_VAL_0, id="other_0"))])
    dataset = formats.load(tmp_path)
    assert [i.id for i in dataset.items] == ["86CxyhFV9MI_0"] and dataset.name == "lvb_val"


# -- 3. lvb_test_wo_gt.json --------------------------------------------------------------------------
def test_longvideobench_test_questions_are_read_without_answers_and_say_so(tmp_path):
    ann = _json(tmp_path / "lvb_test_wo_gt.json", [rec.lvb_test(rec.LVB_VAL_0)])
    for fmt in ("auto", "longvideobench"):
        dataset = formats.load(ann, fmt)
        item, = dataset.items
        assert dataset.format == "longvideobench" and item.answer is None and len(item.options) == 4
        assert dataset.notes == ["1 of 1 questions have no correct_choice (the test split): they are answered and "
                                 "count for agreement with the unpruned model, not for accuracy"]


def test_longvideobench_test_split_is_answered_for_agreement(model_dirs, tmp_path):
    ann = _json(tmp_path / "lvb_test_wo_gt.json", [rec.lvb_test(rec.LVB_VAL_0)])
    _clip(tmp_path / "videos" / "86CxyhFV9MI.mp4")
    result = sharp("eval", ann, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,sharp",
                   "--tie-seeds", 1, "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    none, pruned = out["rows"]
    assert none["accuracy"] is None and none["questions"] == 1 and pruned["agreement_questions"] == 1
    assert "no correct_choice" in result.stderr
    assert none["headline"] == {"metric": "Overall", "value": None, "definition": "accuracy over questions",
                                "groups": {}}


# -- 4. MVBench as lmms-eval downloads it (OpenGVLab/MVBench, revision `video`) -----------------------
def _mvbench_video_revision(root: Path, json_records: dict) -> dict:
    """json/ with the given records, and the clips where revision `video` keeps them; returns stem -> clip."""
    for stem, record in json_records.items():
        _json(root / "json" / f"{stem}.json", [record])
    clips = {
        "action_antonym": root / "ssv2_video_mp4" / "166583.mp4",
        "object_interaction": root / "star" / "Charades_segment" / "USNP1_1.2999999999999998_15.4.mp4",
        "action_localization": root / "sta" / "sta_video_segment" / rec.MVBENCH_LOCALIZATION_CLIP,
        "fine_grained_pose": root / "nturgbd_convert" / "S009C003P016R002A006_rgb.mp4",
        "episodic_reasoning": root / "tvqa" / "video_fps3_hq_segment" / "s01e02_seg02_clip_07.mp4",
    }
    for clip in clips.values():
        _touch(clip)
    return clips


LMMS_MVBENCH = {
    "action_antonym": rec.MVBENCH_ANTONYM_VIDEO,
    "object_interaction": rec.MVBENCH_INTERACTION_VIDEO,
    # Stand-in questions on the quoted clip names (see benchmark_records):
    "action_localization": {"video": rec.MVBENCH_LOCALIZATION_CLIP, "question": "When does the action happen?",
                            "candidates": ["At the beginning.", "At the end."], "answer": "At the end."},
    "fine_grained_pose": dict(rec.MVBENCH_POSE, video="S009C003P016R002A006_rgb.mp4"),
    "episodic_reasoning": {"video": "s01e02_seg02_clip_07.mp4", "question": "Why?", "candidates": ["a", "b"],
                           "answer": "a"},
}


def test_mvbench_lmms_eval_layout_finds_the_five_renamed_folders(tmp_path):
    clips = _mvbench_video_revision(tmp_path, LMMS_MVBENCH)
    dataset = formats.drop_missing(formats.load(tmp_path), skip=False)
    assert dataset.format == "mvbench" and dataset.notes == []  # cut windows, videos: nothing skipped or caveated
    assert {i.id.rsplit("-", 1)[0]: i.video for i in dataset.items} == {k: str(v) for k, v in clips.items()}
    antonym = next(i for i in dataset.items if i.id == "action_antonym-0")
    assert (antonym.answer, antonym.category, antonym.group) == ("C", "Action Antonym", "Action Antonym")


def test_mvbench_main_json_with_the_video_revision_clips_and_a_video_dir(tmp_path):
    """The main revision's json (166583.webm; USNP1.mp4 + start/end) finds revision `video`'s clips
    (another suffix; the cut clip's name), also when --video-dir names the folder holding the task folders."""
    main = {"action_antonym": rec.MVBENCH_ANTONYM_MAIN, "object_interaction": rec.MVBENCH_INTERACTION_MAIN}
    clips = _mvbench_video_revision(tmp_path / "elsewhere", {})
    for stem, record in main.items():
        _json(tmp_path / "MVBench" / "json" / f"{stem}.json", [record])
    with pytest.raises(SharpError, match="2 of 2 videos not found.*MVBench's task folders"):
        formats.drop_missing(formats.load(tmp_path / "MVBench"), skip=False)
    dataset = formats.drop_missing(formats.load(tmp_path / "MVBench", video_dir=str(tmp_path / "elsewhere")), False)
    assert [i.video for i in dataset.items] == [str(clips["action_antonym"]), str(clips["object_interaction"])]
    assert dataset.notes == []


def test_mvbench_main_revision_whole_videos_keep_their_caveat(tmp_path):
    _json(tmp_path / "json" / "object_interaction.json", [rec.MVBENCH_INTERACTION_MAIN])
    _touch(tmp_path / "video" / "star" / "Charades_v1_480" / "USNP1.mp4")
    dataset = formats.drop_missing(formats.load(tmp_path), skip=False)
    assert dataset.items[0].video == str(tmp_path / "video" / "star" / "Charades_v1_480" / "USNP1.mp4")
    assert any("start..end window" in n and "Object Interaction" in n for n in dataset.notes)


# -- 5. lmms-eval's MLVU (sy1998/MLVU_dev) -------------------------------------------------------------
MLVU_DEV = [rec.mlvu_dev(rec.MLVU_NEEDLE, "needle", "Q0"), rec.mlvu_dev(rec.MLVU_PLOT, "plotQA", "Q0"),
            rec.mlvu_dev(rec.MLVU_ORDER[0], "order", "Q0"), rec.mlvu_dev(rec.MLVU_ORDER[1], "order", "Q1")]


def _mlvu_dev(root: Path, clip=_touch) -> Path:
    """lmms-eval's cache folder `mlvu`: the parquet in mlvu/, the videos unzipped beside it (one zip's
    videos in a folder of their own)."""
    ann = _parquet(root / "mlvu" / "test-00000-of-00001.parquet", MLVU_DEV)
    clip(root / "video_part_1" / "needle_32.mp4")
    for name in ("movie101_66.mp4", "order_126.mp4", "order_151.mp4"):
        clip(root / name)
    return ann


def test_mlvu_dev_parquet_is_read(tmp_path):
    ann = _mlvu_dev(tmp_path)
    for data in (tmp_path, ann):
        dataset = formats.drop_missing(formats.load(data), skip=False)
        assert dataset.format == "mlvu" and len(dataset.items) == 4
        needle, plot, *_ = dataset.items
        assert needle.question == "What does the hand coming out of the computer do?"
        assert needle.options == rec.MLVU_NEEDLE["candidates"] and needle.answer == "A"
        assert needle.video == str(tmp_path / "video_part_1" / "needle_32.mp4")
        assert (plot.answer, plot.category, plot.group) == ("A", "plotQA", "plotQA")
        assert len({i.id for i in dataset.items}) == 4  # question_id repeats across task types


def test_mlvu_dev_records_as_json_and_options_only_in_the_question(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "candidates"} for row in MLVU_DEV[:2]]
    ann = _json(tmp_path / "mlvu_dev.json", rows)
    needle, plot = formats.load(ann).items
    assert needle.options == rec.MLVU_NEEDLE["candidates"] and plot.options == rec.MLVU_PLOT["candidates"]
    assert plot.question == rec.MLVU_PLOT["question"]


def test_mlvu_official_release_folder(tmp_path):
    _json(tmp_path / "MLVU" / "json" / "5_order.json", rec.MLVU_ORDER)
    _json(tmp_path / "MLVU" / "json" / "9_summary.json", [rec.MLVU_SUMMARY])
    _touch(tmp_path / "MLVU" / "video" / "5_order" / "order_126.mp4")
    dataset = formats.load(tmp_path)  # the download's outer folder
    assert dataset.format == "mlvu" and [i.answer for i in dataset.items] == ["D", "A"]
    assert dataset.items[0].video == str(tmp_path / "MLVU" / "video" / "5_order" / "order_126.mp4")
    assert dataset.items[0].group == "order" and any("without candidates" in n for n in dataset.notes)


# -- lmms-eval's caches: questions in the hub snapshot, videos in the task's cache_dir ---------------------
def _snapshot(hf_home: Path, repo: str) -> Path:
    return hf_home / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"


@pytest.mark.parametrize("cache, repo, annotation, rows, clip, fmt", [
    ("videomme", "lmms-eval/Video-MME", "videomme/test-00000-of-00001.parquet", [rec.VIDEOMME_001_1],
     "data/fFjv93ACGo8.mp4", "videomme"),
    ("mlvu", "sy1998/MLVU_dev", "mlvu/test-00000-of-00001.parquet", MLVU_DEV[:1], "video_part_1/needle_32.mp4", "mlvu"),
    ("datasets/longvideobench", "longvideobench/LongVideoBench", "validation-00000-of-00001.parquet",
     [rec.lvb_parquet_row(rec.LVB_VAL_0)], "videos/86CxyhFV9MI.mp4", "longvideobench"),
])
def test_lmms_eval_cache_folder_or_its_snapshot(tmp_path, cache, repo, annotation, rows, clip, fmt):
    """$HF_HOME/<cache_dir> holds the unpacked videos, $HF_HOME/hub/.../snapshots/<sha>/ the questions
    (lmms_eval/api/task.py): either one, given as DATA, finds the other."""
    ann = _parquet(_snapshot(tmp_path, repo) / annotation, rows)
    video = _touch(tmp_path / cache / clip)
    for data in (tmp_path / cache, ann, _snapshot(tmp_path, repo)):
        dataset = formats.drop_missing(formats.load(data), skip=False)
        assert dataset.format == fmt and [i.video for i in dataset.items] == [str(video)]


def test_mvbench_lmms_eval_cache_is_a_link_to_its_snapshot(tmp_path):
    snapshot = _snapshot(tmp_path, "OpenGVLab/MVBench")
    clips = _mvbench_video_revision(snapshot, {"action_antonym": rec.MVBENCH_ANTONYM_VIDEO})
    (tmp_path / "mvbench_video").symlink_to(snapshot)
    item, = formats.drop_missing(formats.load(tmp_path / "mvbench_video"), skip=False).items
    assert item.video == str(tmp_path / "mvbench_video" / clips["action_antonym"].relative_to(snapshot))


# -- 6. numbers comparable with published ones --------------------------------------------------------
def test_reference_prompts_are_lmms_evals():
    """lmms-eval's text for each task (yaml default kwargs + utils.py doc_to_text), written out by hand."""
    vmme = formats.Item("q", "/v", rec.VIDEOMME_001_1["question"], ["Apples.", "Berries."], "A")
    assert prompts.videomme(vmme.question, vmme.options) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        + rec.VIDEOMME_001_1["question"] + "\nA. Apples.\nB. Berries.\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert prompts.mvbench("What is it?", ["Not sure", "Piling"]) == (
        "Question:What is it?\nOption:\n(A) Not sure\n(B) Piling\nOnly give the best option.\n")
    row = MLVU_DEV[0]  # lmms-eval: "" + doc["question"] + post_prompt
    assert prompts.mlvu(rec.MLVU_NEEDLE["question"], row["candidates"]) == (
        row["question"] + "\nOnly give the best option.\nBest option: (")
    assert prompts.longvideobench("Q?", ["x", "y"]) == (
        "Q?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.\n")


@pytest.mark.parametrize("make, fmt, style", [
    (lambda d: _json(d / "videomme" / "test.json", [rec.VIDEOMME_001_1]), "videomme", "videomme"),
    (lambda d: _json(d / "json" / "action_antonym.json", [rec.MVBENCH_ANTONYM_MAIN]), "mvbench", "mvbench"),
    (lambda d: _json(d / "json" / "5_order.json", rec.MLVU_ORDER), "mlvu", "mlvu"),
    (lambda d: _json(d / "lvb_val.json", [rec.LVB_VAL_0]), "longvideobench", "longvideobench"),
])
def test_each_benchmark_gets_its_reference_prompt_by_default(tmp_path, make, fmt, style):
    dataset, chosen = prompts.apply(formats.load(make(tmp_path)), "auto")
    assert dataset.format == fmt and chosen == style
    item = dataset.items[0]
    assert item.prompt == prompts.STYLES[style](item.question, item.options) and prompt_for(item) == item.prompt
    ours, _ = prompts.apply(formats.load(make(tmp_path)), "sharp")
    assert prompt_for(ours.items[0]).endswith("Answer with the option's letter from the given choices directly.")
    assert prompts.setting("sharp") == 1 and prompts.setting(style) != prompts.setting("sharp")


def _records(items, correct_by_id, method="none", ratio=1.0):
    return [{"item": i.id, "method": method, "ratio": ratio, "correct": correct_by_id[i.id]} for i in items]


def test_mlvu_m_avg_is_the_mean_over_task_types(tmp_path):
    """3 order questions right, 1 needle wrong: 75% of questions, M-Avg (100% + 0%) / 2 = 50%."""
    rows = MLVU_DEV + [rec.mlvu_dev(rec.MLVU_ORDER[0], "order", "Q2")]
    items = formats.load(_json(tmp_path / "dev.json", [rows[0], *rows[2:]])).items
    correct = {i.id: i.group == "order" for i in items}
    row = {"method": "none", "ratio": 1.0, "accuracy": 0.75}
    headline.add([row], _records(items, correct), items, "mlvu")
    assert row["headline"] == {"metric": "M-Avg", "value": 0.5, "definition": "mean of the per-task-type accuracies",
                               "groups": {"needle": 0.0, "order": 1.0}}
    # --category-field changes the breakdown, not the headline's groups
    other = formats.load(_json(tmp_path / "dev.json", [rows[0], *rows[2:]]), category_field="duration").items
    assert [i.group for i in other] == [i.group for i in items] and other[0].category == "467.98"


def test_mvbench_avg_is_the_mean_over_tasks(tmp_path):
    _json(tmp_path / "json" / "action_antonym.json", [rec.MVBENCH_ANTONYM_MAIN] * 3)
    _json(tmp_path / "json" / "object_interaction.json", [rec.MVBENCH_INTERACTION_MAIN])
    items = formats.load(tmp_path).items
    row = {"method": "none", "ratio": 1.0, "accuracy": 0.25}
    headline.add([row], _records(items, {i.id: i.id == "object_interaction-0" for i in items}), items, "mvbench")
    assert row["headline"]["value"] == 0.5 and row["headline"]["metric"] == "Avg"


def test_eval_reports_m_avg_beside_accuracy_with_lmms_evals_prompt(model_dirs, tmp_path, monkeypatch):
    from sharp_cli import answer

    _mlvu_dev(tmp_path, clip=_clip)
    asked = []
    real_ask = answer.ask
    monkeypatch.setattr(answer, "ask", lambda *a, **k: asked.append(a[2]) or real_ask(*a, **k))
    args = ("eval", tmp_path, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none")
    result = sharp(*args, "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    row, = out["rows"]
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    correct = {r["item"]: r["correct"] for r in lines}
    by_task = {}
    for item_id, ok in correct.items():
        by_task.setdefault(item_id.split("-")[0], []).append(ok)
    m_avg = sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)
    assert row["headline"]["metric"] == "M-Avg" and row["headline"]["value"] == pytest.approx(m_avg)
    assert set(row["headline"]["groups"]) == {"needle", "plotQA", "order"}
    assert out["settings"]["prompt"] == "mlvu/1" and asked[0] == MLVU_DEV[0]["question"] + (
        "\nOnly give the best option.\nBest option: (")
    assert "M-Avg" in result.stderr and "mean of the per-task-type accuracies" in result.stderr
    # --prompt sharp: another prompt, so another settings value (no mixing in one results file)
    other = sharp(*args, "--prompt", "sharp", "-o", tmp_path / "r.jsonl", "-q")
    assert other.exit_code == 2 and "prompt: mlvu/1 there, 1 now" in other.stderr
    before = len(asked)
    assert sharp(*args, "--prompt", "sharp", "-o", tmp_path / "r2.jsonl", "-q").exit_code == 0
    assert asked[before + 1] == (rec.MLVU_PLOT["question"] + "\nA. Yellow\nB. Red\nC. Green\nD. Blue\n"
                                 "Answer with the option's letter from the given choices directly.")


def test_bad_prompt_is_a_usage_error(tmp_path):
    _json(tmp_path / "lvb_val.json", [rec.LVB_VAL_0])
    result = sharp("eval", tmp_path, "--prompt", "lmms")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "sharp: error: --prompt must be one of auto, sharp, videomme, mvbench, mlvu, longvideobench, got 'lmms'"]

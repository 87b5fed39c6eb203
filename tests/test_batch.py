"""`sharp batch` through the CLI runner: JSON lines in, one JSON line per item out, bad items as
error lines, exit codes, stdin, and resuming an interrupted run with --output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    make_video(root / "a.mp4", n_frames=24, fps=8, size=(112, 84))
    make_video(root / "b.mp4", n_frames=16, fps=8, size=(112, 56))
    return root


def sharp(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def write_items(path, items):
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_every_item_gets_a_line_and_a_bad_item_does_not_stop_the_run(model_dirs, folder, tmp_path):
    model = model_dirs["qwen2.5-vl"]
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "first", "video": str(folder / "a.mp4"), "question": "what colour is the ball?"},
        "{this is not json",
        {"id": "gone", "video": "missing.mp4", "question": "what?"},
        {"id": 70, "video": str(folder / "b.mp4"), "question": "what?", "ratio": 2},
        {"id": "typo", "video": str(folder / "b.mp4"), "question": "what?", "ratoi": 0.5},
        "",
        {"video": str(folder / "b.mp4"), "question": "how many?", "method": "none"},
    ])
    result = sharp("batch", items, "-m", model, *SMALL)
    assert result.exit_code == 1, result.stderr
    out = lines(result.stdout)
    assert [o["id"] for o in out] == ["first", 2, "gone", 70, "typo", 7]  # no id: the line number
    good, bad_json, missing, bad_ratio, typo, unnamed = out
    alone = json.loads(sharp("ask", folder / "a.mp4", "what colour is the ball?", "-m", model, *SMALL,
                             "--json").stdout)
    assert good["answer"] == alone["answer"] and good["visual_tokens_kept"] == alone["visual_tokens_kept"]
    assert set(alone) - {"warmup", "load_seconds"} <= set(good)  # the model loads once per run
    assert set(bad_json) == {"id", "error"} and "line 2 is not JSON" in bad_json["error"]
    assert "file not found" in missing["error"]
    assert bad_ratio["error"] == "ratio must be in (0, 1], got 2.0"
    assert typo["error"] == "ratoi: unknown field"
    assert unnamed["method"] == "none" and unnamed["visual_tokens_kept"] == unnamed["visual_tokens_total"]
    assert "[1/6] first: ok" in result.stderr and "2 answered, 4 failed" in result.stderr
    assert "Traceback" not in result.output


def test_all_good_is_exit_zero_and_item_options_apply(model_dirs, folder, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "kept-half", "video": "a.mp4", "question": "what?", "ratio": 0.5, "frames": 4, "max_tokens": 1},
        {"id": "method-none", "video": "b.mp4", "question": "what?", "method": "none"},
    ])
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--video-dir", folder, "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    half, none = lines(result.stdout)
    assert half["frames"] == 4 and half["new_tokens"] == 1 and half["ratio"] == 0.5
    assert half["visual_tokens_kept"] == int(0.5 * half["visual_tokens_total"] + 0.5)
    assert none["ratio"] == 1.0 and none["visual_tokens_kept"] == none["visual_tokens_total"]


def test_stdin_and_paths_relative_to_the_current_folder(model_dirs, folder, monkeypatch):
    monkeypatch.chdir(folder)
    text = json.dumps({"id": "s", "video": "b.mp4", "question": "what?"}) + "\n"
    result = sharp("batch", "-", "-m", model_dirs["qwen2.5-vl"], *SMALL, input=text)
    assert result.exit_code == 0, result.stderr
    (only,) = lines(result.stdout)
    assert only["id"] == "s" and only["video"].endswith("b.mp4") and only["answer"] is not None
    assert "[1] s: ok" in result.stderr  # no total known for stdin


def test_resume_skips_answered_ids_and_redoes_a_cut_line(model_dirs, folder, tmp_path, monkeypatch):
    from sharp_cli import answer

    items = write_items(tmp_path / "items.jsonl", [
        {"id": n, "video": "ab"[n % 2] + ".mp4", "question": f"question {n}?"} for n in range(4)])
    out = tmp_path / "out.jsonl"
    model = model_dirs["qwen2.5-vl"]
    real, calls = answer.ask, []

    def interrupted(*args, **kwargs):  # Ctrl-C while the third item is being answered
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(answer, "ask", interrupted)
    first = sharp("batch", items, "-m", model, *SMALL, "-o", out, "--video-dir", folder)
    assert first.exit_code == 130 and "interrupted" in first.stderr, first.stderr
    assert first.stdout == ""  # with --output the lines go to the file
    assert [r["id"] for r in lines(out.read_text())] == [0, 1]
    with open(out, "a") as handle:  # and the interruption left half a line behind
        handle.write('{"id": 2, "answer": "half')
    monkeypatch.setattr(answer, "ask", real)

    second = sharp("batch", items, "-m", model, *SMALL, "-o", out, "--video-dir", folder)
    assert second.exit_code == 0, second.stderr
    records = lines(out.read_text())
    assert [r["id"] for r in records] == [0, 1, 2, 3] and all("answer" in r for r in records)
    assert "0: answered before, skipped" in second.stderr and "2 answered, 0 failed, 2 answered in" in second.stderr


def test_resume_retries_failed_items(model_dirs, folder, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "ok", "video": str(folder / "a.mp4"), "question": "what?"},
        {"id": "later", "video": "late.mp4", "question": "what?"},
    ])
    out = tmp_path / "out.jsonl"
    model = model_dirs["qwen2.5-vl"]
    first = sharp("batch", items, "-m", model, *SMALL, "--output", out)
    assert first.exit_code == 1 and [r.get("error") is None for r in lines(out.read_text())] == [True, False]
    make_video(tmp_path / "late.mp4", n_frames=8, fps=8, size=(56, 56))
    second = sharp("batch", items, "-m", model, *SMALL, "--output", out)
    assert second.exit_code == 0, second.stderr
    records = lines(out.read_text())
    assert [r["id"] for r in records] == ["ok", "later", "later"] and "answer" in records[-1]


def test_duplicate_ids_are_errors(model_dirs, folder, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "x", "video": str(folder / "a.mp4"), "question": "what?", "max_tokens": 1},
        {"id": "x", "video": str(folder / "b.mp4"), "question": "what?"},
    ])
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL)
    assert result.exit_code == 1
    assert lines(result.stdout)[1] == {"id": "x", "error": "duplicate id 'x' (line 1 has it too)"}


@pytest.mark.parametrize("args, message", [
    (["nowhere.jsonl"], "no such file: nowhere.jsonl"),
    (["ITEMS", "--ratio", "0"], "--ratio must be in (0, 1]"),
    (["ITEMS", "--output", "FOLDER"], "--output is a folder"),
    (["ITEMS", "--video-dir", "/no/such/dir"], "--video-dir is not a folder"),
    (["ITEMS", "--output", "ITEMS"], "--output is the input file"),
])
def test_bad_command_lines_are_usage_errors(model_dirs, tmp_path, args, message):
    items = write_items(tmp_path / "items.jsonl", [{"video": "a.mp4", "question": "what?"}])
    args = [str(items) if a == "ITEMS" else str(tmp_path) if a == "FOLDER" else a for a in args]
    result = sharp("batch", *args, "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("sharp: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_questions_about_one_video_reuse_its_frames_vision_output_and_prompt_start(model_dirs, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    make_video(folder / "a.mp4", n_frames=16, fps=8, size=(112, 84))
    questions = ["what colour is the ball?", "where is the dog?", "what colour is the ball?"]
    items = write_items(tmp_path / "items.jsonl",
                        [{"id": i, "video": "v/a.mp4", "question": q} for i, q in enumerate(questions)])
    cached = lines(sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL).stdout)
    fresh = lines(sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--cache-gb", "0").stdout)
    assert [c["video_cache"] for c in cached] == [{"vision": False, "prefix": False}] + [
        {"vision": True, "prefix": True}] * 2
    assert all(f["video_cache"] is None for f in fresh)
    assert [c["answer"] for c in cached] == [f["answer"] for f in fresh]
    assert cached[2]["video_seconds"] < cached[0]["video_seconds"]  # no decoding the second time

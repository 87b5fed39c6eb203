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
    (["ITEMS", "--output", "FOLDER"], "is a folder, not a file"),
    (["ITEMS", "--output", "/no/such/folder/out.jsonl"], "the folder '/no/such/folder' does not exist"),
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


def test_questions_about_one_video_reuse_its_frames_vision_output_and_prompt_start(model_dirs, tmp_path,
                                                                                   monkeypatch):
    folder = tmp_path / "v"
    folder.mkdir()
    make_video(folder / "a.mp4", n_frames=16, fps=8, size=(112, 84))
    questions = ["what colour is the ball?", "where is the dog?", "what colour is the ball?"]
    items = write_items(tmp_path / "items.jsonl",
                        [{"id": i, "video": "v/a.mp4", "question": q} for i, q in enumerate(questions)])
    decoded = _spy_decoded(monkeypatch)
    cached = lines(sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL).stdout)
    decodes_cached = len(decoded)
    fresh = lines(sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--cache-gb", "0").stdout)
    assert [c["video_cache"] for c in cached] == [{"vision": False, "prefix": False}] + [
        {"vision": True, "prefix": True}] * 2
    assert all(f["video_cache"] is None for f in fresh)
    assert [c["answer"] for c in cached] == [f["answer"] for f in fresh]
    assert decodes_cached == 1 and len(decoded) - decodes_cached == 3  # the frames decoded once, not per question


# -- hostile input and a full-size video (issue 27) ------------------------------------------------
def _spy_decoded(monkeypatch):
    """The frames of every clip load_video returns, as decoded (a spy: nothing is changed)."""
    from sharp_cli import video as video_mod

    shapes, real = [], video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: shapes.append(real(*a, **k).frames.shape)
                        or real(*a, **k))
    return shapes


def test_a_large_video_is_decoded_at_the_models_pixel_budget(model_dirs, tmp_path, monkeypatch):
    """1080p frames (2,073,600 pixels) become 560x1008 while decoding, the size Qwen2.5-VL's processor
    makes of them (at most 768 tokens' worth), not full size; the grid is the reference's."""
    make_video(tmp_path / "hd.mp4", n_frames=8, fps=8, size=(1920, 1080))
    items = write_items(tmp_path / "items.jsonl", [{"id": "hd", "video": "hd.mp4", "question": "what?",
                                                    "frames": 2, "max_tokens": 1, "method": "none"}])
    shapes = _spy_decoded(monkeypatch)
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], "-q")
    assert result.exit_code == 0, result.stdout
    (record,) = lines(result.stdout)
    assert record["token_grid"] == [1, 20, 36]
    assert shapes and all(shape[1:3] == (560, 1008) for shape in shapes)
    assert max(shape[0] * shape[1] * shape[2] * 3 for shape in shapes) <= 2 * 768 * 28 * 28 * 3  # bytes a clip


def test_an_item_over_the_models_context_is_an_error_line_and_the_run_goes_on(model_dirs, folder, tmp_path,
                                                                             monkeypatch):
    import shutil

    short = tmp_path / "short-context"
    shutil.copytree(model_dirs["qwen2.5-vl"], short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 200
    (short / "config.json").write_text(json.dumps(config))
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "long", "video": "a.mp4", "question": "what?", "frames": 24},
        {"id": "short", "video": "a.mp4", "question": "what?", "frames": 2, "max_tokens": 1},
    ])
    shapes = _spy_decoded(monkeypatch)
    result = sharp("batch", items, "-m", short, "--max-pixels", 56 * 56 * 4, "--video-dir", folder)
    assert result.exit_code == 1
    long, fine = lines(result.stdout)
    assert set(long) == {"id", "error"} and "over the model's 200-token context (max_position_embeddings)" in \
        long["error"] and "lower frames (or fps / max_frames) or max_pixels" in long["error"]
    assert "answer" in fine and len(shapes) == 1  # the long clip was refused from its header, never decoded


def test_item_max_pixels_has_an_upper_bound(model_dirs, folder, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [{"id": 1, "video": "a.mp4", "question": "what?",
                                                    "max_pixels": 10**15}])
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], "--video-dir", folder)
    assert result.exit_code == 1
    assert lines(result.stdout)[0]["error"] == \
        "max_pixels must be in [1, 16,777,216] (a 4096x4096 frame), got 1,000,000,000,000,000"


def test_invalid_utf8_and_deeply_nested_lines_are_error_lines(model_dirs, folder, tmp_path):
    good = json.dumps({"id": "ok", "video": "a.mp4", "question": "what?", "max_tokens": 1}).encode()
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": "latin1", "video": "a.mp4", "question": "caf\xe9?"}\n'
                     + b"[" * 100_000 + b"]" * 100_000 + b"\n" + good + b"\n")
    result = sharp("batch", path, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--video-dir", folder)
    assert result.exit_code == 1 and "Traceback" not in result.output
    latin1, nested, ok = lines(result.stdout)
    assert latin1 == {"id": 1, "error": "line 1 is not UTF-8 text (byte 0xe9 at 52)"}
    assert nested == {"id": 2, "error": "line 2 is not JSON this program reads (nested too deeply)"}
    assert ok["id"] == "ok" and "answer" in ok


@pytest.mark.parametrize("content", [
    b'{"video": "a.mp4", "question": "what?", "id": 1}\n{"video": "b.mp4", "question": "why?", "id": 2}\n',
    b"notes from the meeting\nno newline at the end",
    b"a single line without a newline",
    b'{"id": 1, "error": "x"}\n{"video": "a.mp4", "question": "what?", "id": 2}\n',
    b"a log line\nanother\n",
    b'{"settings": {}}\n',
])
def test_output_refuses_a_file_that_is_not_ours_and_leaves_it_untouched(model_dirs, folder, tmp_path, content):
    items = write_items(tmp_path / "items.jsonl", [{"id": 9, "video": "a.mp4", "question": "what?"}])
    out = tmp_path / "precious.txt"
    out.write_bytes(content)
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--video-dir", folder, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "is not a results file of sharp's" in result.stderr
    assert out.read_bytes() == content


def test_output_keeps_our_complete_records_and_cuts_only_our_unfinished_line(model_dirs, folder, tmp_path):
    from sharp_cli import jsonl

    items = write_items(tmp_path / "items.jsonl", [{"id": n, "video": "a.mp4", "question": "what?",
                                                    "max_tokens": 1} for n in range(2)])
    out = tmp_path / "out.jsonl"
    assert sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--video-dir", folder, "-o",
                 out).exit_code == 0
    kept = out.read_bytes()
    assert jsonl.check_ours(out, jsonl.is_batch_record) == len(kept)
    out.write_bytes(kept + b'{"id": 2, "answer": "cut off here')
    assert jsonl.check_ours(out, jsonl.is_batch_record) == len(kept)
    handle = jsonl.open_for_append(out, jsonl.is_batch_record)
    handle.close()
    assert out.read_bytes() == kept


def test_an_items_frame_count_turns_off_the_default_fps(model_dirs, folder, tmp_path):
    """--fps 2 for the run; an item asking for 4 frames gets 4, not the 6 of 3 s at 2 frames a second."""
    from sharp_cli.overrides import BatchItem, Defaults, resolve
    from sharp_cli.prune.config import PruneConfig

    video = dict(frames=32, fps=2.0, max_frames=768, max_pixels=None, backend="auto")
    plan = resolve(BatchItem(video="a.mp4", question="q", frames=4), Defaults(PruneConfig(layer=2), video))
    assert plan.video["frames"] == 4 and plan.video["fps"] is None
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "four", "video": "a.mp4", "question": "what?", "frames": 4, "max_tokens": 1},
        {"id": "default", "video": "a.mp4", "question": "what?", "max_tokens": 1},
    ])
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], "--fps", "2", "--max-pixels", 56 * 56 * 4,
                   "--video-dir", folder, "-q")
    assert result.exit_code == 0, result.stderr
    assert [r["frames"] for r in lines(result.stdout)] == [4, 6]  # a.mp4: 24 frames at 8 fps, 3 s


# -- multiple-choice items, and the item files of `sharp eval` and `sharp synth` -------------------
QUESTION = "What colour is the ball?"
CHOICES = ["red", "blue", "green"]


def test_options_ask_evals_multiple_choice_prompt_and_give_the_letter(model_dirs, folder, tmp_path, monkeypatch):
    """An item's options make the prompt `sharp eval` asks (the "A. red" lines, the instruction), one at
    a time and decoded together alike; the line adds the letter eval reads from the answer."""
    from sharp_cli import answer
    from sharp_cli.letters import INSTRUCTION, build_prompt, parse_letter

    model = model_dirs["qwen2.5-vl"]
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "mc", "video": "a.mp4", "question": QUESTION, "options": ["A. red", "B. blue", "C. green"]},
        {"id": "bare", "video": "a.mp4", "question": QUESTION},
        {"id": "open", "video": "a.mp4", "question": QUESTION, "options": []},  # as in eval: the bare question
    ])
    asked, real = [], answer.ask
    monkeypatch.setattr(answer, "ask", lambda loaded, clip, question, *a, **k: asked.append(question)
                        or real(loaded, clip, question, *a, **k))
    result = sharp("batch", items, "-m", model, *SMALL, "--video-dir", folder, "-q")
    assert result.exit_code == 0, result.stderr
    prompt = build_prompt(QUESTION, CHOICES)
    assert prompt == f"{QUESTION}\nA. red\nB. blue\nC. green\n{INSTRUCTION}"
    assert asked == [prompt, QUESTION, QUESTION]
    mc, bare, open_ = lines(result.stdout)
    assert list(mc)[:3] == ["id", "answer", "prediction"]
    assert mc["prediction"] == parse_letter(mc["answer"], CHOICES)
    assert "prediction" not in bare and "prediction" not in open_
    assert mc["sequence_tokens"] > bare["sequence_tokens"] == open_["sequence_tokens"]
    monkeypatch.setattr(answer, "ask", real)
    together = lines(sharp("batch", items, "-m", model, *SMALL, "--video-dir", folder, "-q", "--max-batch", "3").stdout)
    for a, b in zip([mc, bare, open_], together):
        assert {k: a.get(k) for k in ("id", "answer", "prediction", "sequence_tokens")} == \
            {k: b.get(k) for k in ("id", "answer", "prediction", "sequence_tokens")}
    assert "prediction" in together[0] and "prediction" not in together[1]


def test_a_sharp_synth_items_file_runs_as_it_is(model_dirs, tmp_path, monkeypatch):
    """synth's items (answer, category, needle_* besides video, question, options) are batch items;
    a field neither format has is still that item's error."""
    from sharp_cli import answer
    from sharp_cli.evaluate import synth
    from sharp_cli.letters import build_prompt

    items = synth.write(tmp_path / "s", 2, seed=5, frames=8, size=64)
    written = [json.loads(line) for line in items.read_text().splitlines()]
    with open(items, "a") as handle:
        handle.write(json.dumps({**written[0], "id": "typo", "questoin": "what?"}) + "\n")
    asked, real = [], answer.ask
    monkeypatch.setattr(answer, "ask", lambda loaded, clip, question, *a, **k: asked.append(question)
                        or real(loaded, clip, question, *a, **k))
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL)
    assert result.exit_code == 1, result.stderr
    first, second, typo = lines(result.stdout)
    assert [first["id"], second["id"]] == [w["id"] for w in written] and "prediction" in first and "answer" in second
    assert asked == [build_prompt(w["question"], w["options"]) for w in written]
    assert typo == {"id": "typo", "error": "questoin: unknown field"}
    assert "2 answered, 1 failed" in result.stderr


def test_every_field_synth_writes_is_one_batch_knows():
    from sharp_cli.evaluate import synth
    from sharp_cli.evaluate.items import ITEM_FIELDS

    for i, task in enumerate(synth.TASKS):
        _, item = synth.make_item(0, i, synth.TASKS)
        assert set(item) | {"video"} <= set(ITEM_FIELDS), task


@pytest.mark.parametrize("fields, error", [
    ({"options": ["only one"]}, "options: expected a list of 2 to 26 answer texts, got 1"),
    ({"options": "red or blue"}, "options: expected a list of 2 to 26 answer texts"),
    ({"options": ["red", None]}, "options: expected a list of 2 to 26 answer texts"),
    ({"options": [f"o{i}" for i in range(27)]}, "options: expected a list of 2 to 26 answer texts, got 27"),
    ({"questoin": "what?"}, "questoin: unknown field"),
    ({"frames": True}, "frames: expected a number, got true"),
    ({"ratio": False}, "ratio: expected a number, got false"),
    ({"max_tokens": True}, "max_tokens: expected a number, got true"),
    ({"ratio": "0.5"}, "ratio: expected a number, got a string"),
    ({"options": ["red", "blue"], "answer": "B", "category": "colour", "needle_boxes": [[0, 1, 2, 3, 4]],
      "needle_frames": [0], "needle_part": "start", "camera": "pan", "scene_starts": [0]}, None),
    ({"options": [1, 2, 3]}, None),  # counts: read as text, as eval reads them
])
def test_item_fields_are_checked_one_line_each(fields, error):
    from sharp_cli.batch import parse_item

    item_id, item, message = parse_item(json.dumps({"id": "x", "video": "a.mp4", "question": "q?", **fields}), 3)
    assert item_id == "x" and message == error
    if error is None:
        assert item.options == [str(o) for o in fields["options"]]


def test_help_says_which_fields_an_item_may_have():
    from sharp_cli.evaluate.items import ITEM_FIELDS
    from sharp_cli.overrides import BatchItem

    text = " ".join(sharp("batch", "--help").stdout.split())
    assert all(name in text for name in (*ITEM_FIELDS, *BatchItem.model_fields)), text

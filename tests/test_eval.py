"""`sharp eval` end to end (sharp_cli/evaluate/commands.py) on a tiny random model: the table, --compile,
resume, errors recorded, bad arguments, --help, a results file that is not ours. The parts have their
own files: test_eval_letters, _formats, _synth, _runner, _agreement (and _seeds, _stats, _together)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import SMALL, read_jsonl, sharp
from sharp_cli.cli import app
from sharp_cli.evaluate import runner
from videos import make_video

cli = CliRunner()
CELLS = [("none", 1.0), ("fastv", 0.5), ("random", 0.5), ("sharp", 0.5)]


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
    records = read_jsonl(out)
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
        answers[bool(flag)] = {runner.line_key(r): (r["output"], r["first_token"]) for r in read_jsonl(out)}
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
    assert len(calls) == 4 and len(read_jsonl(out)) == 4
    result = sharp(*args, "--json")
    assert result.exit_code == 0 and len(calls) == 6  # only the third item's 2 answers
    assert {r["questions"] for r in json.loads(result.stdout)["rows"]} == {3}
    keys = [runner.line_key(r) for r in read_jsonl(out)]
    assert len(keys) == len(set(keys)) == 6
    with open(out, "a") as fh:
        fh.write('{"item": "order-0002", "method": "sha')  # killed mid-write
    assert sharp(*args).exit_code == 0 and len(calls) == 6
    assert len(read_jsonl(out)) == 6  # the unfinished line was cut off, nothing redone
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
    assert "broken.mp4" in read_jsonl(default)[0]["error"]


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
    failed = [r for r in read_jsonl(out) if r.get("error")]
    assert len(failed) == 2 and all(r["retry"] and "out of GPU memory" in r["error"] for r in failed)
    assert {r["method"] for r in failed} == {"fastv"} and len(read_jsonl(out)) == 4
    monkeypatch.setattr(answer_mod, "prefill", real)
    second = sharp(*args)
    assert second.exit_code == 0, second.stderr
    lines = read_jsonl(out)
    assert len(lines) == 6 and [(r["method"], "error" in r) for r in lines[4:]] == [("fastv", False)] * 2
    rows = {r["method"]: r for r in json.loads(second.stdout)["rows"]}
    assert rows["fastv"]["errors"] == 0 and rows["fastv"]["questions"] == 2
    assert sharp(*args).exit_code == 0 and len(read_jsonl(out)) == 6  # nothing left to answer


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


def test_a_jsonl_line_that_is_not_json_is_named_by_its_line_in_the_file(model_dirs, tmp_path):
    """Each line is parsed alone: the message names the file's line (blank lines counted), not line 1
    of that one line, as `sharp batch` names it."""
    good = json.dumps({"video": "a.mp4", "question": "q?", "options": ["a", "b"], "answer": "A"})
    data = tmp_path / "qa.jsonl"
    data.write_text(f"{good}\n\n{{not json\n{good}\n")
    result = sharp("eval", data, "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.strip() == f"sharp: error: cannot read {data}: line 3 is not JSON " \
        "(Expecting property name enclosed in double quotes)"
    data.write_text(f"{good}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    result = sharp("eval", data, "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"sharp: error: cannot read {data}: line 2 is not JSON this program reads " \
        "(nested too deeply)"


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

    missing = cli.invoke(app, ["eval", str(items), "-m", str(model_dirs["qwen2.5-vl"]), "-o",
                               str(tmp_path / "no-such-folder" / "results.jsonl")])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr

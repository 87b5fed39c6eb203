"""The failure policy (sharp_cli/errors.py): a command's failure is one line and an exit code; one
item's failure in a run of many is one recorded line; SHARP_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.errors import UsageError, VideoError, debug_enabled, item_failure
from sharp_cli.jsonl import dumps, plain
from sharp_cli.report import print_json
from videos import make_video

runner = CliRunner()
FEW = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_sharp_debug_is_off_when_unset_empty_or_zero(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("SHARP_DEBUG", raising=False)
    else:
        monkeypatch.setenv("SHARP_DEBUG", value)
    assert debug_enabled() is on


def test_an_items_failure_is_one_line_and_says_whether_memory_ran_out(monkeypatch):
    monkeypatch.delenv("SHARP_DEBUG", raising=False)
    assert item_failure(VideoError("cannot read video x.mp4:\n  moov atom not found")) == (
        "cannot read video x.mp4: moov atom not found", False)
    assert item_failure(UsageError("ratio must be in (0, 1]")) == ("ratio must be in (0, 1]", False)
    message, oom = item_failure(torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 20.00 GiB"))
    assert oom and "\n" not in message and "out of GPU memory" in message and "--frames" in message
    message, oom = item_failure(KeyError("frames"))
    assert not oom and message == "KeyError: 'frames' (SHARP_DEBUG=1 shows the traceback)"


def test_an_items_failure_is_raised_under_sharp_debug(monkeypatch):
    monkeypatch.setenv("SHARP_DEBUG", "1")
    with pytest.raises(KeyError):
        try:
            raise KeyError("frames")
        except KeyError as exc:
            item_failure(exc)
    assert item_failure(VideoError("cannot read video x.mp4"))[0] == "cannot read video x.mp4"  # ours: a message


def test_one_json_encoder_turns_tensors_and_arrays_into_numbers(capsys):
    import numpy as np

    record = {"kl": torch.tensor(0.25), "kept": np.arange(3), "n": np.int64(7), "path": Path("clip é.mp4")}
    assert json.loads(dumps(record)) == {"kl": 0.25, "kept": [0, 1, 2], "n": 7, "path": "clip é.mp4"}
    print_json(record)
    assert json.loads(capsys.readouterr().out) == json.loads(dumps(record))
    assert plain(torch.tensor([1, 2])) == [1, 2]


def test_debug_shows_a_commands_traceback(model_dirs, tmp_path, monkeypatch):
    from sharp_cli import bench

    def broken(*args, **kwargs):
        raise KeyError("frames")

    monkeypatch.setattr(bench, "run", broken)
    args = ["bench", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "4", "--height", "56", "--width", "56"]
    monkeypatch.delenv("SHARP_DEBUG", raising=False)
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 1
    assert quiet.stderr.strip() == "sharp: error: KeyError: 'frames' (SHARP_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("SHARP_DEBUG", "1")
    loud = runner.invoke(app, args)
    assert isinstance(loud.exception, KeyError)


@pytest.fixture(scope="module")
def unicode_video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


def test_out_of_memory_names_what_to_lower(model_dirs, unicode_video, monkeypatch):
    from sharp_cli import engine

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine, "prefill", oom)
    result = runner.invoke(app, ["ask", unicode_video, "what?", "-m", str(model_dirs["qwen2.5-vl"]), *FEW])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "out of GPU memory" in line
    assert "--frames" in line and "--max-pixels" in line and "--ratio" in line

"""`sharp ask --server URL` (or SHARP_SERVER) against a live `sharp serve` app: the same answer,
table and --json as a local run, by path or uploaded, and one clear line when it cannot be."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from typer.testing import CliRunner

from serving import SMALL_PIXELS, LiveServer
from sharp_cli.cli import app

QUESTION = "what colour is the ball?"
# What LiveServer's defaults are, as `sharp ask` flags: the same question asked locally.
LOCAL = ["--frames", "8", "--max-pixels", str(SMALL_PIXELS), "--ratio", "0.25", "--debias", "subtract",
         "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def server(loaded, media):
    with LiveServer(loaded, media, api_key=None) as live:
        yield live


def sharp(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_the_answer_and_json_through_a_server_are_a_local_runs(server, media, model_dirs):
    path = str(media / "clip one.mp4")
    local = sharp("ask", path, QUESTION, "-m", model_dirs["qwen2.5-vl"], *LOCAL, "--json")
    served = sharp("ask", path, QUESTION, "--server", server.url, "--json")
    assert local.exit_code == 0 and served.exit_code == 0, served.stderr
    mine, theirs = json.loads(local.stdout), json.loads(served.stdout)
    assert theirs["answer"] == mine["answer"] and theirs["new_tokens"] == mine["new_tokens"]
    assert set(mine) <= set(theirs) and theirs["video"] == path and theirs["server"] == server.url
    for key in ("method", "ratio", "layer", "frames", "token_grid", "visual_tokens_kept", "stop", "options"):
        assert theirs[key] == mine[key], key
    text = sharp("ask", path, QUESTION, env={"SHARP_SERVER": server.url + "/v1"})  # the env, and a /v1 URL
    assert text.exit_code == 0 and text.stdout.strip() == mine["answer"]
    assert "sharp ask" in text.stderr and f"{server.url}," in text.stderr and "visual tokens" in text.stderr


def test_options_given_go_with_the_question(server, media):
    served = sharp("ask", media / "wide.mp4", QUESTION, "--server", server.url, "--json", "--ratio", "0.5",
                   "--max-new-tokens", "2", "--method", "fastv")
    assert served.exit_code == 0, served.stderr
    record = json.loads(served.stdout)
    assert record["ratio"] == 0.5 and record["method"] == "fastv" and record["new_tokens"] <= 2


def test_a_video_outside_the_servers_media_folder_is_uploaded(server, media, model_dirs, tmp_path):
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(media / "tall.mp4", outside)
    served = sharp("ask", outside, QUESTION, "--server", server.url, "--json")
    assert served.exit_code == 0, served.stderr
    record = json.loads(served.stdout)
    local = json.loads(sharp("ask", outside, QUESTION, "-m", model_dirs["qwen2.5-vl"], *LOCAL, "--json").stdout)
    assert record["answer"] == local["answer"] and record["video"] == str(outside)


def test_streamed_pieces_join_to_the_answer(server, media):
    from sharp_cli.serve import client

    pieces = []
    record = client.ask(server.url, str(media / "clip one.mp4"), QUESTION, {"max_tokens": 8}, on_text=pieces.append)
    assert pieces and "".join(pieces) == record["answer"]


def test_an_unreachable_server_is_one_line_and_exit_1(media):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    result = sharp("ask", media / "wide.mp4", QUESTION, "--server", f"127.0.0.1:{port}")
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sharp: error: cannot reach sharp serve at http://127.0.0.1:{port}")


@pytest.mark.parametrize("args, code, message", [
    (["--quant", "nf4"], 2, "--quant: set by the server"),
    (["--ratio", "2"], 2, "the server refused the question: ratio must be in (0, 1]"),
    (["-m", "some/other-model"], 1, "The model 'some/other-model' does not exist"),
])
def test_what_the_server_cannot_take_is_one_line(server, media, args, code, message):
    result = sharp("ask", media / "wide.mp4", QUESTION, "--server", server.url, *args)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_a_video_the_server_cannot_read_exits_as_a_local_ask_would(server, tmp_path):
    """Not a video (the server says invalid_video): exit 1 and the server's line, as `sharp ask` without
    --server says it, not exit 2 (a bad flag)."""
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video at all")
    result = sharp("ask", fake, QUESTION, "--server", server.url)
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read video" in lines[0]


def test_a_missing_video_is_said_before_asking(server, tmp_path):
    result = sharp("ask", tmp_path / "nowhere.mp4", QUESTION, "--server", server.url)
    assert result.exit_code == 1 and "file not found" in result.stderr


def test_the_api_key_comes_from_sharp_api_key(loaded, media):
    with LiveServer(loaded, media, api_key="s3cret") as live:
        refused = sharp("ask", media / "wide.mp4", QUESTION, "--server", live.url, env={"SHARP_API_KEY": ""})
        assert refused.exit_code == 1 and "API key was refused" in refused.stderr
        allowed = sharp("ask", media / "wide.mp4", QUESTION, "--server", live.url, "-q",
                        env={"SHARP_API_KEY": "s3cret"})
        assert allowed.exit_code == 0 and allowed.stdout.strip()

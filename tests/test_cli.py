"""Every command through the CLI runner, as a user runs it: stdout, stderr, JSON, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import videos  # noqa: F401
from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
ASK_KEYS = {"answer", "model", "method", "ratio", "layer", "frames", "visual_tokens_total", "visual_tokens_kept",
            "prefill_seconds", "kv_cache_bytes", "kv_cache_bytes_unpruned", "peak_memory_bytes", "device", "quant"}
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("v") / "clip one.mp4", n_frames=24, fps=8, size=(112, 84)))


def sharp(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl"])
def test_ask_prints_answer_on_stdout_and_table_on_stderr(model_dirs, video, family):
    result = sharp("ask", video, "what colour is the ball?", "-m", model_dirs[family], *SMALL)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(sharp("ask", video, "what colour is the ball?", "-m", model_dirs[family], *SMALL,
                              "--json").stdout)["answer"]
    assert answer and result.stdout == answer + "\n"
    for label in ("visual tokens", "LLM prefill", "KV cache", "memory saved", "peak GPU memory"):
        assert label in result.stderr
    assert "none (CPU: no quantization)" in result.stderr


def test_ask_json_has_the_documented_keys(model_dirs, video):
    result = sharp("ask", video, "what colour is the ball?", "-m", model_dirs["qwen2.5-vl"], *SMALL,
                   "--json", "--method", "fastv", "--ratio", "0.25")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert ASK_KEYS <= set(record)
    assert record["method"] == "fastv" and record["ratio"] == 0.25 and record["layer"] == 2
    assert record["visual_tokens_kept"] == max(1, int(0.25 * record["visual_tokens_total"] + 0.5))
    assert record["kv_cache_bytes"] < record["kv_cache_bytes_unpruned"]
    assert record["frames"] == 8 and record["device"] == "cpu" and record["quant"] == "none"


def test_ask_method_none_reports_ratio_one(model_dirs, video):
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--json", "--method", "none")
    record = json.loads(result.stdout)
    assert record["ratio"] == 1.0 and record["visual_tokens_kept"] == record["visual_tokens_total"]
    assert record["kv_cache_bytes"] == record["kv_cache_bytes_unpruned"]


def test_ask_decodes_the_video_while_the_model_loads(model_dirs, video, monkeypatch):
    # A one-off question pays the model load; decoding a long video after it would add its seconds on top.
    import threading

    from sharp_cli import loading
    from sharp_cli import video as video_mod

    events, decoding_started = [], threading.Event()
    real_decode, real_load = video_mod.load_video, loading.load

    def decode(*args, **kwargs):
        events.append(("decode", threading.current_thread().name))
        decoding_started.set()
        return real_decode(*args, **kwargs)

    def load(*args, **kwargs):
        assert decoding_started.wait(30)  # the decode is under way before the load returns
        events.append(("load", threading.current_thread().name))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(video_mod, "load_video", decode)
    monkeypatch.setattr(loading, "load", load)
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    decoders = [name for kind, name in events if kind == "decode"]
    assert decoders and all(name.startswith("sharp-decode") for name in decoders)
    assert ("load", "MainThread") in events
    record = json.loads(result.stdout)
    assert record["video_seconds"] > 0 and record["load_seconds"] > 0 and record["prepare_seconds"] > 0
    table = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL).stderr
    assert "(during the model load)" in table and "processor" in table


def test_a_video_that_fails_while_the_model_loads_is_one_line(model_dirs, video, monkeypatch):
    from sharp_cli import video as video_mod
    from sharp_cli.errors import VideoError

    def broken(path, **kwargs):
        raise VideoError(f"{path}: not a video file, or truncated or corrupted (planted)")

    monkeypatch.setattr(video_mod, "load_video", broken)
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL)
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sharp: error:") and "(planted)" in result.stderr


def test_quiet_prints_the_answer_alone(model_dirs, video):
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "-q")
    assert result.exit_code == 0
    assert result.stderr == "" and len(result.stdout.strip().splitlines()) <= 1


def test_model_from_environment_variable(model_dirs, video, monkeypatch):
    monkeypatch.setenv("SHARP_MODEL", str(model_dirs["qwen2.5-vl"]))
    result = sharp("ask", video, "what?", *SMALL, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["model"] == str(model_dirs["qwen2.5-vl"])


def test_same_input_same_answer_and_kept_set(model_dirs, video):
    args = ("ask", video, "what colour?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--json")
    a, b = json.loads(sharp(*args).stdout), json.loads(sharp(*args).stdout)
    assert a["answer"] == b["answer"] and a["visual_tokens_kept"] == b["visual_tokens_kept"]


def test_pyav_fallback_when_decord_breaks(model_dirs, video, monkeypatch):
    import decord

    import sharp_cli.video as video_mod

    monkeypatch.setattr(video_mod, "AUTO_ORDER", ("decord", "pyav"))  # decord first, as another CPU may measure

    def broken(*args, **kwargs):
        raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(decord, "VideoReader", broken)
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["decoder"] == "pyav"
    assert "decord" in result.stderr  # the note says why


@pytest.mark.parametrize("args, code, message", [
    (["--ratio", "0"], 2, "--ratio must be in (0, 1]"),
    (["--ratio", "1.5"], 2, "--ratio must be in (0, 1]"),
    (["--layer", "0"], 2, "--layer must be >= 1"),
    (["--layer", "4"], 2, "--layer must be < 4"),
    (["--method", "magic"], 2, "unknown method 'magic'"),
    (["--frames", "0"], 2, "frames"),
    (["--fps", "0"], 2, "fps"),
    (["--debias", "sideways"], 2, "--debias"),
    (["--device", "cuda"], 1, "no CUDA GPU"),
    (["--quant", "nf4"], 2, "--quant nf4 needs a CUDA GPU"),
    (["--bogus-flag"], 2, "No such option"),
    (["--temperature", "inf"], 2, "--temperature must be a finite number >= 0, got inf"),
    (["--temperature", "nan"], 2, "--temperature must be a finite number >= 0, got nan"),
    (["--seed", str(2**70)], 2, "--seed must be in [0, 2**64 - 1]"),
])
def test_bad_arguments_get_one_line_and_an_exit_code(model_dirs, video, args, code, message):
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, *args)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharp: error:") and message in lines[0]
    assert "Traceback" not in result.output


def test_empty_question_is_a_usage_error(model_dirs, video):
    result = sharp("ask", video, "   ", "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 2 and "question is empty" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.mp4", "not found"),
    (lambda d: d, "directory"),
])
def test_bad_video_paths(model_dirs, tmp_path, make, message):
    result = sharp("ask", make(tmp_path), "what?", "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code == 1 and message in result.stderr.lower() and len(result.stderr.splitlines()) == 1


def test_unknown_model_offline_is_one_line(video, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = sharp("ask", video, "what?", "-m", "nobody/no-such-model-xyz", *SMALL)
    assert result.exit_code == 1 and "cannot load" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "-m sharp-tiny runs offline" in result.stderr  # the one model a user without the hub has


def test_help_names_the_choices_and_does_not_cut_summaries():
    summary = sharp("--help").stdout.split("Commands:")[1]
    assert "..." not in summary and all(name in summary for name in ("ask", "bench", "eval", "serve", "batch"))
    assert max(len(line) for line in summary.splitlines()) <= 80
    options = sharp("ask", "--help").stdout
    for choices in ("[auto|cuda|cpu]", "[auto|nf4|int8|none]", "[auto|decord|pyav]"):
        assert choices in options


def test_fewer_frames_than_asked_is_said_and_one_token_is_singular(model_dirs, video):
    """The 24-frame clip with --frames 64: all 24 are used, and the note says so (stderr and JSON)."""
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], "--frames", "64", "--max-pixels",
                   str(56 * 56 * 4), "--max-new-tokens", "1")
    assert result.exit_code == 0, result.stderr
    assert "note: the video has 24 frames: all are used, fewer than the 64 asked for" in result.stderr
    assert "1 token " in result.stderr and "1 tokens" not in result.stderr
    record = json.loads(sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], "--frames", "64",
                              "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "1", "--json").stdout)
    assert record["frames"] == 24 and record["notes"] == ["the video has 24 frames: all are used, fewer than the "
                                                          "64 asked for"]


def test_frames_cut_by_max_frames_are_said(model_dirs, video):
    """--frames above --max-frames samples --max-frames, and the note gives both numbers."""
    record = json.loads(sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], "--frames", "20",
                              "--max-frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "1",
                              "--json").stdout)
    assert record["frames"] == 8 and record["notes"] == ["20 frames asked for, 8 used: --max-frames is 8"]


def test_synth_says_how_to_evaluate_offline(tmp_path):
    result = sharp("synth", str(tmp_path / "s"), "--n", "1", "--frames", "8", "--size", "64")
    assert result.exit_code == 0, result.stderr
    said = "".join(result.stderr.split())  # the console wraps long paths anywhere
    assert f"1questionin{tmp_path / 's' / 'items.jsonl'};evaluatewith:sharpeval{tmp_path / 's' / 'items.jsonl'}" \
        "-msharp-tiny" in said


def test_a_folder_that_is_not_a_video_llm(tmp_path, video):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    result = sharp("ask", video, "what?", "-m", folder, *SMALL)
    assert result.exit_code == 1 and "not a supported video LLM" in result.stderr
    assert "qwen2.5-vl" in result.stderr


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from sharp_cli.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = sharp("--help")
    assert result.exit_code == 0 and "ask" in result.stdout and "bench" in result.stdout


_LAYER_CHECK = """
import sys
from sharp_cli.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    print(exc.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", ["ask", "batch", "serve", "ask-random-weights"])
def test_a_layer_beyond_the_models_depth_is_refused_before_torch_loads(video, tmp_path, command):
    """--layer 99 on an 8-layer model: one line and exit 2 from the model's config.json alone, not
    after seconds of imports and a model load."""
    items = tmp_path / "items.jsonl"
    items.write_text('{"video": "v.mp4", "question": "what?"}\n')
    args = {"ask": ["ask", video, "what?", "-m", "sharp-tiny"], "batch": ["batch", str(items), "-m", "sharp-tiny"],
            "serve": ["serve", "-m", "sharp-tiny", "--port", "0"],
            "ask-random-weights": ["ask", video, "what?", "-m", "Qwen/Qwen2.5-VL-7B-Instruct", "--random-weights"]}
    out = subprocess.run([sys.executable, "-c", _LAYER_CHECK, *args[command], "--layer", "99"], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr[-1000:])
    depth = 28 if command == "ask-random-weights" else 8
    assert out.stderr.strip() == f"sharp: error: --layer must be < {depth} (the model's decoder layers), got 99"


def test_fresh_process_end_to_end(model_dirs, video):
    """A real `python -m sharp_cli` process: catches import-order crashes in-process tests hide (decord
    loaded before torch crashed torch's CPU matrix multiplies, so decord is asked for)."""
    env = dict(os.environ, SHARP_DEBUG="0")
    out = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what?", "-m", str(model_dirs["qwen2.5-vl"]),
                          *SMALL, "--decoder", "decord", "--json", "-q"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["decoder"] == "decord"


def test_env_lists_versions():
    result = sharp("env")
    assert result.exit_code == 0
    for name in ("python", "torch", "transformers", "bitsandbytes", "video decoders", "gpu"):
        assert name in result.stdout


def test_debug_env_shows_the_traceback(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARP_DEBUG", "1")
    result = sharp("ask", tmp_path / "missing.mp4", "what?", "-m", model_dirs["qwen2.5-vl"])
    assert result.exit_code != 0 and result.exception is not None


def test_bench_rows_and_consistency(model_dirs, tmp_path):
    out_file = tmp_path / "bench.json"
    result = sharp("bench", "-m", model_dirs["qwen2.5-vl"], "--frames", "8", "--height", "56", "--width", "112",
                   "--ratio", "0.25,0.5", "--iters", "2", "--warmup", "0", "--decode-tokens", "3", "--json",
                   "--output-json", out_file)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert json.loads(out_file.read_text())["rows"] == data["rows"]
    stock, *rows = data["rows"]
    assert stock["method"] == "transformers" and stock["tokens"] and stock["tokens_agree"] is True
    assert [(r["method"], r["ratio"]) for r in rows] == [("none", 1.0)] + [
        (m, r) for m in ("fastv", "random", "sharp") for r in (0.25, 0.5)]
    base = rows[0]
    assert all(len(r["tokens"]) == 3 for r in rows)  # EOS ignored: every row decodes as many
    assert all(r["e2e_seconds"] >= r["ttft_seconds"] > 0 for r in rows)
    # --warmup 0: a sharp row's first answer is also a timed one, plus the prior pass and the first
    # encode (the stock row always warms up once: its first call is not among the timed ones)
    assert all(r["first_answer_seconds"] >= r["e2e_seconds_min"] for r in rows) and stock["first_answer_seconds"] > 0
    assert all(r["e2e_speedup"] == pytest.approx(stock["e2e_seconds"] / r["e2e_seconds"]) for r in rows)
    for r in rows[1:]:
        assert r["first_token_kl"] >= 0 and isinstance(r["first_token_agree"], bool)
    assert base["speedup"] == 1.0 and base["flops_limit"] == 1.0
    from sharp_cli.measure import prefill_flops, text_dims
    from sharp_cli.models.random_init import tiny_config

    dims = text_dims(tiny_config("qwen2.5-vl"))
    n = base["visual_tokens_total"]
    for r in rows[1:]:
        assert r["visual_tokens_kept"] == max(1, int(r["ratio"] * n + 0.5))
        assert r["tokens_after_pruning"] == base["sequence_tokens"] - n + r["visual_tokens_kept"]
        assert r["prefill_flops"] == prefill_flops(dims, base["sequence_tokens"], r["tokens_after_pruning"], 2)
        assert r["flops_limit"] == pytest.approx(base["prefill_flops"] / r["prefill_flops"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_limit"])
        assert r["kv_cache_bytes"] < base["kv_cache_bytes"]
    assert "sharp bench" in result.stderr and "first answer of a row" in result.stderr


def test_bench_rejects_unknown_methods(model_dirs):
    result = sharp("bench", "-m", model_dirs["qwen2.5-vl"], "--methods", "none,warp")
    assert result.exit_code == 2 and "unknown method 'warp'" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--methods", ""], "--methods: give at least one method"),
    (["--methods", ","], "--methods: give at least one method"),
    (["--output-json", "/no/such/folder/x.json"], "the folder '/no/such/folder' does not exist"),
    (["--plot", "/no/such/folder/x.png"], "the folder '/no/such/folder' does not exist"),
])
def test_bench_refuses_what_it_could_not_do_before_any_work(args, message):
    """Checked before the model: a model that does not exist would otherwise be the error."""
    result = sharp("bench", "-m", "nobody/no-such-model-xyz", *args)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_bench_refuses_a_layout_over_max_visual_tokens_before_loading():
    result = sharp("bench", "--random-weights", "--frames", "32", "--max-visual-tokens", "1000")
    assert result.exit_code == 2 and "6,272 visual tokens" in result.stderr and "--max-visual-tokens" in result.stderr


# -- the bare command, --version, env; Ctrl-C, output files, paths ----------------------------------
FEW = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def unicode_video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


def test_bare_sharp_prints_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage:") and "ask" in result.stdout and len(result.stdout.splitlines()) > 8
    out = subprocess.run([sys.executable, "-m", "sharp_cli"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and out.stdout.startswith("Usage:") and out.stderr == ""


def test_version():
    from sharp_cli import __version__

    result = sharp("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"sharp {__version__}"


def test_env_names_the_module_that_imports():
    import importlib.metadata as md

    result = sharp("env")
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("decord (module)"))
    import decord

    assert decord.__version__ in line and "not installed" not in result.stdout.split("decord (module)")[1]
    if "decord2" in md.packages_distributions().get("decord", []):
        assert "from decord2" in line


def test_the_video_is_checked_before_any_model_lookup(tmp_path, monkeypatch):
    from sharp_cli import hub, loading

    def looked_up(*args, **kwargs):
        raise AssertionError("the model was looked up before the video was checked")

    monkeypatch.setattr(hub, "check_reachable", looked_up)
    monkeypatch.setattr(loading, "read_config", looked_up)
    result = sharp("ask", tmp_path / "video.mp4", "what?", "-m", "nobody/nothing")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "cannot read video" in result.stderr and "not found" in result.stderr


def test_ctrl_c_exits_130_and_leaves_no_partial_output(model_dirs, tmp_path, monkeypatch):
    from sharp_cli import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    target = tmp_path / "result.json"
    target.write_text("previous results\n")
    result = runner.invoke(app, ["bench", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "4", "--height", "56",
                                 "--width", "56", "--output-json", str(target)])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert target.read_text() == "previous results\n"  # the user's file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_output_json_is_replaced_atomically(model_dirs, tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    result = runner.invoke(app, ["bench", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "4", "--height", "56",
                                 "--width", "56", "--iters", "1", "--warmup", "0", "--decode-tokens", "0",
                                 "--methods", "none,random", "--output-json", str(target), "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(target.read_text())["rows"][1]["method"] == "random"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_unicode_and_spaces_in_paths(model_dirs, unicode_video):
    result = runner.invoke(app, ["ask", unicode_video, "what?", "-m", str(model_dirs["qwen2.5-vl"]), *FEW, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["video"] == unicode_video

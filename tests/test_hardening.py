"""Failure modes: one line and an exit code, nothing half-written; selection invariants."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.prune import keep_count, rank
from sharp_cli.prune.baselines import select_fastv, select_random
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


def test_out_of_memory_names_what_to_lower(model_dirs, video, monkeypatch):
    from sharp_cli import engine

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine, "prefill", oom)
    result = runner.invoke(app, ["ask", video, "what?", "-m", str(model_dirs["qwen2.5-vl"]), *SMALL])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "out of GPU memory" in line
    assert "--frames" in line and "--max-pixels" in line and "--ratio" in line


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


def test_unicode_and_spaces_in_paths(model_dirs, video):
    result = runner.invoke(app, ["ask", video, "what?", "-m", str(model_dirs["qwen2.5-vl"]), *SMALL, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["video"] == video


def test_remote_code_is_off_unless_asked(monkeypatch, model_dirs):
    from sharp_cli import loading

    seen = {}
    from transformers import AutoModelForImageTextToText

    real = AutoModelForImageTextToText.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", spy)
    loading.load(str(model_dirs["qwen2.5-vl"]), device="cpu")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    loading.load(str(model_dirs["qwen2.5-vl"]), device="cpu", trust_remote_code=True)
    assert seen["trust_remote_code"] is True


def test_pickle_weights_are_refused(model_dirs, video, tmp_path, monkeypatch):
    """A real pickle checkpoint folder (config and processor fine, weights torch.save'd) behind a
    real video: the run gets past the video and the config to the weights, refuses them in one
    line, and never unpickles anything."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(model_dirs["qwen2.5-vl"], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or real_load(*a, **k))
    decoded = []
    from sharp_cli import video as video_mod

    real_decode = video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: decoded.append(a) or real_decode(*a, **k))
    result = runner.invoke(app, ["ask", video, "what?", "-m", str(folder), *SMALL])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pickled" in result.stderr and "pytorch_model.bin" in result.stderr and "safetensors" in result.stderr
    assert decoded and not unpickled  # it reached the weights, and left them unopened


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 10_000))
def test_selection_invariants(n, ratio, seed):
    k = keep_count(ratio, n)
    assert 1 <= k <= n
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen)
    flagged = torch.rand(n, generator=gen) < 0.3
    order = rank.rank(scores, seed)
    for kept in (select_fastv(scores, ratio, seed)[0], select_random(n, ratio, seed), rank.first_unskipped(order, flagged, k)):
        values = kept.tolist()
        assert len(values) == k and values == sorted(set(values)) and 0 <= values[0] and values[-1] < n
    refill = set(rank.first_unskipped(order, flagged, k).tolist())
    unflagged = int((~flagged).sum())
    if k <= unflagged:  # flagged tokens are used only when the unflagged ones run out
        assert not any(flagged[i] for i in refill)
    else:
        assert sum(1 for i in refill if not flagged[i]) == unflagged  # every unflagged one is kept


_MEMORY_PROBE = """
import re, sys, time
sys.path.insert(0, {tests!r})
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child of a
# pytest worker that has loaded models would report the worker's peak instead of its own.
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
import torch, av  # the libraries a decode maps in (decord2 alone maps ~0.4 GB) are not frames
try:
    import decord
except ImportError:
    pass
from sharp_cli.video import load_video
libraries = peak_kib()
start = time.perf_counter()
clip = load_video({path!r}, frames={frames}, max_pixels={max_pixels} or None, backend={backend!r})
print(clip.frames.shape, round(time.perf_counter() - start, 2), peak_kib(), peak_kib() - libraries)
"""


def _probe(path, frames, max_pixels, backend):
    """(frames shape, seconds, peak RSS bytes, peak RSS bytes above the imported libraries), measured
    in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    code = _MEMORY_PROBE.format(tests=str(Path(__file__).parent), path=str(path), frames=frames,
                                max_pixels=max_pixels, backend=backend)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    shape, seconds, peak_kib, decode_kib = out.stdout.strip().rsplit(" ", 3)
    return shape, float(seconds), int(peak_kib) * 1024, int(decode_kib) * 1024


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_8k_frames_are_resized_while_decoding(tmp_path, backend):
    """7680x4320 frames come back small, and decoding never holds the sampled frames at full size.
    Measured above the imported libraries: ~170 MB (decord) and ~300 MB (PyAV, whose frame threads
    each hold a 50 MB YUV frame); the 4 full-size RGB frames would add 400 MB on top."""
    path = make_video(tmp_path / "8k.mp4", n_frames=4, fps=2, size=(7680, 4320), gop=1)
    shape, _, _, decoding = _probe(path, 4, 640 * 360, backend)
    assert shape == "(4, 360, 640, 3)"
    assert decoding < 500 * 2**20


def test_three_hour_video_is_sampled_with_little_memory(tmp_path):
    from videos import make_long_video

    path = make_long_video(tmp_path / "long.mp4")
    shape, seconds, peak, _ = _probe(path, 32, 0, "auto")
    assert shape.startswith("(32,") and peak < 2 * 2**30 and seconds < 20


def test_eval_output_refuses_a_file_that_is_not_ours_before_loading(model_dirs, video, tmp_path, monkeypatch):
    """`sharp eval -o` at a file that is not eval's results (here: its own questions) is one line,
    exit 2, before the model loads, and the file keeps every byte."""
    from sharp_cli import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", never)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "q1", "video": video, "question": "what?", "options": ["a", "b"],
                                 "answer": "A"}) + "\n")
    before = items.read_bytes()
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(before)
    result = runner.invoke(app, ["eval", str(items), "-m", str(model_dirs["qwen2.5-vl"]), "-o", str(copy)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "is not a results file of sharp's (line 1" in result.stderr
    assert copy.read_bytes() == before


def test_a_full_disk_under_the_prior_cache_keeps_the_prior_in_memory(video, tmp_path):
    """A file-size limit makes every write fail as a full disk does (EFBIG, raised by safetensors as
    its own SafetensorError, not OSError): `sharp ask` still answers, with one warning line."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # Python ignores SIGXFSZ: writes fail instead

    env = dict(os.environ, SHARP_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parent.parent))
    done = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what colour is it?", "-m", "sharp-tiny",
                           "--max-new-tokens", "2", "-q"], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot write the positional-prior cache" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr
    priors = tmp_path / "cache" / "priors"
    assert not priors.exists() or not any(p.stat().st_size for p in priors.iterdir())  # nothing half-written kept

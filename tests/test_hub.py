"""The hub (sharp_cli/hub.py): an unreachable hub is one quick line, a cached model still runs, the
probe is bounded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from videos import make_video

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("fc") / "clip.mp4", n_frames=16, fps=8, size=(112, 84)))


def _no_network_env(tmp_path, **extra):
    """A subprocess environment with the hub unreachable at once (a closed local port) and an empty
    Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(REPO), **extra)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    return env


def test_unreachable_hub_is_one_quick_line(video, tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what?", "-m", "nobody/no-model"],
                         capture_output=True, text=True, timeout=120, env=_no_network_env(tmp_path))
    elapsed = time.perf_counter() - start
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("sharp: error: cannot reach the Hugging Face Hub")
    assert "HF_HUB_OFFLINE=1" in out.stderr and "-m" in out.stderr and "not in the local cache" in out.stderr
    assert elapsed < 20, f"{elapsed:.1f} s (transformers' own retries take ~40 s)"


def test_unreachable_hub_uses_a_cached_model(video, tmp_path, model_dirs):
    """The model in the hub cache and no network: the run goes on from the cache, offline."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(model_dirs["qwen2.5-vl"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    out = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what?", "-m", "someone/tiny", *SMALL,
                          "--json"], capture_output=True, text=True, timeout=300, env=_no_network_env(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["model"] == "someone/tiny"


def test_hub_probe_is_bounded(monkeypatch):
    """A hub that accepts the connection and never answers costs the probe's timeout, no more."""
    import socket

    from huggingface_hub import constants

    from sharp_cli import hub

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections are queued, never answered
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        start = time.perf_counter()
        reason = hub.unreachable(timeout=0.5)
        assert reason and time.perf_counter() - start < 2.5
    finally:
        silent.close()

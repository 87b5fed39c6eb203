"""PyAV's seeking reader (sharp_cli/seek.py) on small synthetic videos: seeks made, streams that
cannot seek, long files sampled quickly, and the memory a decode takes."""

from __future__ import annotations

import time

import pytest

from conftest import BACKENDS
from sharp_cli.frame_sampling import sample_indices
from sharp_cli.video import load_video
from videos import frame_indices, make_long_video, make_video


@pytest.fixture
def seeks(monkeypatch):
    """The seeks PyAV's reader makes, logged."""
    import av

    log = []
    real_open = av.open

    class Counting:  # av's containers are extension types, so wrap one instead of patching it
        def __init__(self, c):
            self._c = c

        def __getattr__(self, name):
            return getattr(self._c, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._c.close()

        def seek(self, *args, **kwargs):
            log.append(args)
            return self._c.seek(*args, **kwargs)

    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    return log


def test_nearby_targets_decode_forward_without_reseeking(vids, seeks):
    clip = load_video(vids["mkv_gop5"], frames=None, backend="pyav")
    assert frame_indices(clip.frames) == list(range(60))
    assert len(seeks) == 1


def test_raw_stream_without_timestamps_or_seeking(tmp_path):
    # A raw H.264 stream: no duration, no timestamps, no seeking. Its rate is FFmpeg's
    # 25 fps guess, since the raw stream doesn't carry the real 10 fps.
    clip = load_video(make_video(tmp_path / "raw.h264", n_frames=30, gop=10), frames=6, backend="pyav")
    assert clip.total_frames == 30 and frame_indices(clip.frames) == clip.indices == sample_indices(30, 25, frames=6)
    assert any("counting packets" in n for n in clip.notes) and any("cannot seek" in n for n in clip.notes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_video_is_sampled_quickly(tmp_path_factory, backend, seeks):
    path = tmp_path_factory.getbasetemp() / "long.mp4"
    if not path.exists():
        make_long_video(path)  # 3 hours at 1 fps, 64x48, a keyframe every 5 minutes
    start = time.perf_counter()
    clip = load_video(path, frames=32, backend=backend)
    elapsed = time.perf_counter() - start
    assert clip.total_frames == 10800 and clip.duration == pytest.approx(3 * 3600)
    assert len(clip.indices) == 32 and frame_indices(clip.frames) == clip.indices
    assert elapsed < 10, f"sampling 32 frames took {elapsed:.1f}s"
    if backend == "pyav":
        assert len(seeks) == 32  # one per frame: they are 5.6 minutes apart, keyframes 5 minutes
        # 42 s apart: the mp4 index shows most have no keyframe in between, so no seek either
        clip = load_video(path, frames=256, backend="pyav")
        assert frame_indices(clip.frames) == clip.indices and len(seeks) - 32 <= 10800 // 300


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

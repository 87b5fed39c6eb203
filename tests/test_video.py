"""Frame sampling and decoding (sharp_cli/video.py) on small synthetic videos."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sharp_cli.errors import UsageError, VideoError
from sharp_cli.frame_sampling import sample_indices
from sharp_cli.video import VideoClip, available_backends, load_video

sys.path.insert(0, os.path.dirname(__file__))
from videos import frame_indices, make_audio_only, make_long_video, make_video, truncate  # noqa: E402

HAS_DECORD = available_backends()["decord"] is not None
BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="decord not installed"))]


@pytest.fixture
def decord_first(monkeypatch):
    """--decoder auto trying decord first, as AUTO_ORDER may say on another machine (the lead's
    measurement decides): its fallbacks to PyAV stay tested."""
    import sharp_cli.video as video

    monkeypatch.setattr(video, "AUTO_ORDER", ("decord", "pyav"))


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """The test videos, encoded once for the module (about a second in all)."""
    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": make_video(d / "h264.mp4"),
        "vp9": make_video(d / "vp9.webm", codec="libvpx-vp9"),
        "mpeg4": make_video(d / "mpeg4.mp4", codec="mpeg4"),
        # B-frames (pts order != decode order) and keyframes every 7 frames: seeks land mid-file.
        "bframes": make_video(d / "bframes.mp4", n_frames=60, gop=7, codec_options={"preset": "medium"}),
        "mkv_gop5": make_video(d / "gop5.mkv", n_frames=60, gop=5),
        # No index: seeks land on any packet, often past the keyframe the target needs.
        "mpegts": make_video(d / "ts.ts", n_frames=60, gop=10),
    }


# ---------------------------------------------------------------- sample_indices


def _check_basic(idx: list[int], total: int) -> None:
    assert idx == sorted(set(idx)), "sorted and unique"
    assert all(0 <= i < total for i in idx)
    assert all(isinstance(i, int) for i in idx)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(0, 200_000),
    src=st.floats(0.5, 240),
    frames=st.integers(1, 2000),
    max_frames=st.integers(1, 1000),
)
def test_sample_indices_frames_mode(total, src, frames, max_frames):
    idx = sample_indices(total, src, frames=frames, max_frames=max_frames)
    _check_basic(idx, total)
    assert len(idx) == min(total, frames, max_frames)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 500_000),
    src=st.floats(1, 120),
    fps=st.floats(0.01, 60),
    max_frames=st.integers(1, 1000),
)
@example(total=285, src=1.9, fps=0.01, max_frames=2)
def test_sample_indices_fps_mode(total, src, fps, max_frames):
    idx = sample_indices(total, src, frames=32, fps=fps, max_frames=max_frames)
    _check_basic(idx, total)
    assert 1 <= len(idx) <= max_frames
    exact = total * fps / src
    wanted = total if fps >= src else max(1, math.ceil(exact - 0.5))
    if fps < src and abs(exact - 0.5 - round(exact - 0.5)) < 1e-9:
        # Exactly half a sample over: float rounding may go either way (285 frames, 1.9 fps, 0.01).
        assert len(idx) in (min(max(1, wanted - 1), max_frames), min(wanted, max_frames))
    else:
        assert len(idx) == min(wanted, max_frames)
    if fps < src and wanted <= max_frames and len(idx) > 1:
        # One sample per 1/fps seconds, the centre of each interval.
        step = src / fps
        assert abs(idx[0] - step / 2) <= 1
        assert all(abs((b - a) - step) <= 1 for a, b in zip(idx, idx[1:]))


def test_sample_indices_examples():
    assert sample_indices(40, 10, frames=8) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert sample_indices(100, 10, fps=1) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
    assert sample_indices(5, 10, frames=32) == [0, 1, 2, 3, 4]
    assert sample_indices(5, 10, fps=30) == [0, 1, 2, 3, 4]  # fps above the source rate: every frame
    assert sample_indices(1, 25, frames=32) == [0]
    assert sample_indices(1, 25, fps=0.01) == [0]  # shorter than one interval: still one frame
    assert sample_indices(0, 25) == []
    # fps mode over the cap: max_frames spread uniformly over the whole video instead
    assert sample_indices(10_000, 10, fps=5, max_frames=4) == sample_indices(10_000, 10, frames=4)
    # exactly at the cap: still one frame every 1/fps seconds (spread uniformly would be 5, 15, 26, ...)
    assert sample_indices(105, 10, fps=1, max_frames=10) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
    assert sample_indices(10_000, 10, frames=1000, max_frames=10) == sample_indices(10_000, 10, frames=10)
    assert sample_indices(7, 10, frames=None) == list(range(7))


@pytest.mark.parametrize(
    "kwargs", [{"frames": 0}, {"frames": -3}, {"fps": 0}, {"fps": -1.0}, {"fps": float("nan")}, {"max_frames": 0}]
)
def test_bad_sampling_arguments_are_usage_errors(kwargs, vids):
    with pytest.raises(UsageError):
        sample_indices(100, 10, **kwargs)
    with pytest.raises(UsageError):
        load_video(vids["h264"], **kwargs)


def test_other_bad_arguments(vids):
    with pytest.raises(UsageError, match="backend"):
        load_video(vids["h264"], backend="opencv")
    with pytest.raises(UsageError, match="max_pixels"):
        load_video(vids["h264"], max_pixels=0)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["h264", "vp9", "mpeg4", "bframes", "mkv_gop5", "mpegts"])
def test_frames_match_indices(vids, kind, backend):
    clip = load_video(vids[kind], frames=8, backend=backend)
    total = 60 if kind in ("bframes", "mkv_gop5", "mpegts") else 40
    assert isinstance(clip, VideoClip)
    assert clip.backend == backend
    assert clip.path == os.fspath(vids[kind])
    assert clip.total_frames == total and clip.fps == pytest.approx(10)
    assert clip.indices == sample_indices(total, 10, frames=8)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, 48, 64, 3)
    assert frame_indices(clip.frames) == clip.indices
    assert clip.duration == pytest.approx(total / 10)
    assert clip.metadata() == {
        "total_num_frames": total,
        "fps": clip.fps,
        "frames_indices": clip.indices,
        "duration": clip.duration,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_fps_mode_and_every_frame(vids, backend):
    clip = load_video(vids["h264"], fps=2, backend=backend)
    assert clip.indices == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frame_indices(clip.frames) == clip.indices
    clip = load_video(vids["bframes"], frames=None, backend=backend)
    assert frame_indices(clip.frames) == clip.indices == list(range(60))


def test_webm_frame_count_is_estimated(vids):
    clip = load_video(vids["vp9"], frames=40, backend="pyav")
    assert clip.total_frames == 40 and frame_indices(clip.frames) == list(range(40))
    assert any("estimated" in n for n in clip.notes)


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
def test_fewer_frames_than_requested(tmp_path, backend):
    clip = load_video(make_video(tmp_path / "five.mp4", n_frames=5), frames=32, backend=backend)
    assert clip.indices == [0, 1, 2, 3, 4] and frame_indices(clip.frames) == clip.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_video(tmp_path, backend):
    path = make_video(tmp_path / "one.mp4", n_frames=1)
    for kwargs in ({"frames": 32}, {"fps": 0.1}, {"fps": 100}):
        clip = load_video(path, backend=backend, **kwargs)
        assert clip.indices == [0] and clip.total_frames == 1 and clip.frames.shape == (1, 48, 64, 3)
        assert frame_indices(clip.frames) == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_size(tmp_path, backend):
    clip = load_video(make_video(tmp_path / "odd.mp4", size=(33, 17)), frames=6, backend=backend)
    assert clip.frames.shape == (6, 17, 33, 3)
    assert frame_indices(clip.frames) == clip.indices


def test_auto_copes_with_widths_decord_rejects(tmp_path):
    # decord2 3.4's get_batch fails on some widths (16, 24, 32, 48, 96, 144, ... here);
    # auto mode must still return the right frames, from whichever decoder.
    clip = load_video(make_video(tmp_path / "w48.mp4", size=(48, 32)), frames=6)
    assert clip.frames.shape == (6, 32, 48, 3) and frame_indices(clip.frames) == clip.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntsc_frame_rate(tmp_path, backend):
    from fractions import Fraction

    path = make_video(tmp_path / "ntsc.mp4", n_frames=90, fps=Fraction(30000, 1001))
    clip = load_video(path, fps=1, backend=backend)
    assert clip.fps == pytest.approx(29.97, abs=0.01) and clip.total_frames == 90
    assert clip.indices == [14, 44, 74] and frame_indices(clip.frames) == clip.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pixels_bounds_every_frame(tmp_path, backend):
    path = make_video(tmp_path / "vga.mp4", n_frames=12, size=(640, 480))
    clip = load_video(path, frames=4, max_pixels=64 * 48, backend=backend)
    t, h, w, _ = clip.frames.shape
    assert t == 4 and h * w <= 64 * 48 and (h, w) == (48, 64)
    assert frame_indices(clip.frames) == clip.indices
    clip = load_video(path, frames=4, max_pixels=1000, backend="pyav")  # not a neat fraction
    t, h, w, _ = clip.frames.shape
    assert h * w <= 1000 and abs(w / h - 4 / 3) < 0.1
    assert frame_indices(clip.frames) == clip.indices
    assert load_video(path, frames=2, max_pixels=10**9, backend=backend).frames.shape == (2, 480, 640, 3)


@pytest.mark.parametrize("backend", ["pyav", "auto"])
@pytest.mark.parametrize("rotation", [90, -90])
def test_quarter_turn_rotation_is_applied(tmp_path, rotation, backend, decord_first):
    # rotation is counter-clockwise (FFmpeg's display matrix convention, which
    # VideoFrame.rotation reports); upright frames are the stored ones turned that way.
    clip = load_video(make_video(tmp_path / "rot.mp4", rotation=rotation), frames=5, backend=backend)
    assert clip.frames.shape == (5, 64, 48, 3)
    assert frame_indices(np.rot90(clip.frames, -rotation // 90, axes=(1, 2))) == clip.indices
    if backend == "auto" and HAS_DECORD:
        # decord2 3.4 crashes on 90-degree rotations; auto mode must cope via PyAV.
        assert clip.backend == "pyav" and any("decord failed" in n for n in clip.notes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_turn_rotation_is_applied(tmp_path, backend):
    clip = load_video(make_video(tmp_path / "rot180.mp4", rotation=180), frames=5, backend=backend)
    assert clip.frames.shape == (5, 48, 64, 3)
    assert frame_indices(np.rot90(clip.frames, 2, axes=(1, 2))) == clip.indices


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


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_deterministic(vids, backend):
    a = load_video(vids["bframes"], frames=9, backend=backend)
    b = load_video(vids["bframes"], frames=9, backend=backend)
    assert a.indices == b.indices and np.array_equal(a.frames, b.frames)


# ---------------------------------------------------------------- decord fallback


def test_auto_reads_with_pyav_first_as_measured(vids):
    """scripts/decoder_bench.py found PyAV faster on this CPU (docs/video.md): auto uses it."""
    from sharp_cli.video import AUTO_ORDER

    assert AUTO_ORDER == ("pyav", "decord")
    clip = load_video(vids["h264"], frames=8)
    assert clip.backend == "pyav" and frame_indices(clip.frames) == clip.indices and clip.notes == []


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_falls_back_to_decord_when_pyav_fails(vids, monkeypatch):
    import av

    import sharp_cli.video as video

    def broken(*args, **kwargs):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(video, "decode_at", broken)
    clip = load_video(vids["h264"], frames=8)
    assert clip.backend == "decord" and frame_indices(clip.frames) == clip.indices
    assert clip.notes[0].startswith("PyAV failed (decoding failed (") and clip.notes[0].endswith("); used decord")
    with pytest.raises(VideoError, match="decoding failed"):  # forced: PyAV's own words
        load_video(vids["h264"], frames=8, backend="pyav")


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_falls_back_to_pyav_when_decord_raises(vids, monkeypatch, decord_first):
    import decord

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(decord, "VideoReader", broken)
    clip = load_video(vids["h264"], frames=8)
    assert clip.backend == "pyav" and frame_indices(clip.frames) == clip.indices
    assert any("decord failed (boom)" in n for n in clip.notes)
    with pytest.raises(VideoError, match="boom") as err:
        load_video(vids["h264"], backend="decord")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_auto_falls_back_when_decord_returns_garbage(vids, monkeypatch, decord_first):
    import decord

    class Garbage:
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 40

        def get_avg_fps(self):
            return 10.0

        def get_batch(self, indices):
            return np.zeros((len(indices), 2, 2, 3), np.uint8)

        def seek(self, pos):
            pass

    monkeypatch.setattr(decord, "VideoReader", Garbage)
    clip = load_video(vids["h264"], frames=8)
    assert clip.backend == "pyav" and frame_indices(clip.frames) == clip.indices
    assert any("decord failed" in n and "shape" in n for n in clip.notes)


def test_missing_decord(vids, monkeypatch):
    import sharp_cli.video as video

    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    assert load_video(vids["h264"], frames=4).backend == "pyav"
    monkeypatch.setattr(video, "AUTO_ORDER", ("decord", "pyav"))
    clip = load_video(vids["h264"], frames=4)
    assert clip.backend == "pyav" and any("not installed" in n for n in clip.notes)
    with pytest.raises(UsageError, match="decord"):
        load_video(vids["h264"], backend="decord")
    assert available_backends()["decord"] is None


def test_available_backends():
    found = available_backends()
    assert set(found) == {"decord", "pyav"} and found["pyav"]


def test_import_is_cheap():
    code = "import sys, sharp_cli.video; print(sorted({'av', 'decord', 'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- bad input


def _assert_one_line_error(path, match, backend="auto"):
    with pytest.raises(VideoError) as err:
        load_video(path, backend=backend)
    message = str(err.value)
    assert "\n" not in message and os.fspath(path) in message and match in message, message
    assert err.value.exit_code == 1
    return message


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_unreadable_inputs(tmp_path, vids, backend):
    if backend == "decord" and not HAS_DECORD:
        pytest.skip("decord not installed")
    (tmp_path / "empty.mp4").touch()
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 20)
    (tmp_path / "photo.mp4").write_bytes(_png_bytes())
    cases = {
        tmp_path / "missing.mp4": "not found",
        tmp_path: "directory",
        tmp_path / "empty.mp4": "empty",
        tmp_path / "notes.mp4": "not a video file",
        tmp_path / "photo.mp4": "still image",
        make_audio_only(tmp_path / "song.mp4"): "no video stream found (is it an audio-only file?)",
        # mp4 keeps its index (moov) at the end: cut in half, nothing is readable
        truncate(vids["h264"], tmp_path / "cut.mp4"): "truncated",
    }
    for path, match in cases.items():
        _assert_one_line_error(path, match, backend)


@pytest.mark.parametrize("url", ["http://example.com/a.mp4", "https://x.org/v.webm", "rtsp://cam/stream", "s3://b/k.mp4"])
def test_urls_are_rejected(url):
    message = _assert_one_line_error(url, "URLs are not supported; download the file first")
    assert message.startswith(f"cannot read video '{url}'")


def test_unreadable_permissions(tmp_path, vids, monkeypatch):
    import sharp_cli.video as video

    def denied(path, *args, **kwargs):  # chmod does not stop root, so fake the refusal
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(video, "open", denied, raising=False)
    _assert_one_line_error(vids["h264"], "Permission denied")


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_truncated_file_returns_the_readable_part(tmp_path, backend):
    # Matroska and faststart mp4 keep their index up front: the first half still decodes.
    # Not backend="decord": decord2 fails at random on the damaged tail (PyAV is used in auto).
    for path in [
        make_video(tmp_path / "a.mkv", n_frames=100, gop=10),
        make_video(tmp_path / "b.mp4", n_frames=100, gop=10, size=(128, 96),
                   container_options={"movflags": "faststart"}),
    ]:
        cut = truncate(path, tmp_path / f"cut-{os.path.basename(path)}")
        clip = load_video(cut, frames=8, backend=backend)
        assert 10 <= clip.total_frames < 100 and len(clip.indices) == 8
        assert all(i < clip.total_frames for i in clip.indices)
        assert frame_indices(clip.frames) == clip.indices
        assert any("truncated" in n for n in clip.notes)
        assert clip.backend == "pyav"


def _png_bytes() -> bytes:
    import av

    frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 8, 8, "rgb24"
    return b"".join(bytes(p) for p in codec.encode(frame))


def test_decord_alone_when_pyav_is_missing(vids, monkeypatch):
    """A minimal install with decord2 but no PyAV still samples the right frames."""
    import importlib.util

    import sharp_cli.video as video

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    clip = video.load_video(vids["h264"], frames=6)
    assert clip.backend == "decord" and frame_indices(clip.frames) == clip.indices
    with pytest.raises(VideoError, match="cannot read video"):
        video.load_video(__file__, frames=2)


# ---------------------------------------------------------------- decord under a busy CPU

_STARVED = r"""
import os, subprocess, sys
sys.path.insert(0, {tests!r})
import torch  # noqa: F401  (before decord, as sharp loads them)
import decord
from videos import frame_indices
from sharp_cli.errors import VideoError
from sharp_cli.video import load_video

decoder_cpu, main_cpu = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, {{main_cpu}})
burn = ("import os, time\nos.sched_setaffinity(0, {{%d}})\nt = time.time()\n"
        "while time.time() - t < 60: pass") % decoder_cpu
burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
Real = decord.VideoReader

def starved(*args, **kwargs):
    # decord's decoder thread shares a CPU with the burners, at the lowest priority, while the
    # thread polling it has a CPU to itself: what a busy machine does to it, every time.
    before = set(os.listdir("/proc/self/task"))
    reader = Real(*args, **kwargs)
    for tid in set(os.listdir("/proc/self/task")) - before:
        os.sched_setaffinity(int(tid), {{decoder_cpu}})
        os.setpriority(os.PRIO_PROCESS, int(tid), 19)
    return reader

decord.VideoReader = starved
try:
    idx = [(2 * k + 1) * 10800 // 64 for k in range(32)]
    raw = frame_indices(starved({path!r}, ctx=decord.cpu(0), num_threads=1).get_batch(idx).asnumpy())
    print("raw wrong", sum(a != b for a, b in zip(raw, idx)), flush=True)
    os.write(2, b"--- sharp from here ---\n")
    clip = load_video({path!r}, frames=32, backend="auto")
    print("auto", clip.backend, frame_indices(clip.frames) == clip.indices, clip.notes, flush=True)
    try:
        clip = load_video({path!r}, frames=32, backend="decord")
        print("decord", frame_indices(clip.frames) == clip.indices, clip.notes)
    except VideoError as exc:
        print("decord refused:", exc)
finally:
    for b in burners:
        b.kill()
"""


@pytest.mark.skipif(not HAS_DECORD or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs decord and two CPUs to pin threads to (Linux)")
def test_decord_losing_its_place_under_load_is_caught(tmp_path_factory):
    """Reproduces decord2's silent wrong frames under CPU load (in about a second: without the
    check, sharp's auto mode returned wrong frames in 4 of 5 runs here), and checks sharp gets the
    right frames anyway: PyAV in auto mode, fresh readers or a one-line refusal with --decoder
    decord; decord's own log line stays off stderr."""
    path = tmp_path_factory.getbasetemp() / "long.mp4"
    if not path.exists():
        make_long_video(path)
    code = _STARVED.format(tests=os.path.dirname(__file__), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    raw, auto, forced = out.stdout.splitlines()
    before, after = out.stderr.split("--- sharp from here ---")
    assert after.strip() == ""  # decord's own log line is kept off stderr
    assert auto.startswith(("auto pyav True", "auto decord True []"))  # right frames, whichever decoder
    assert forced.startswith(("decord True", "decord refused:"))  # right frames, or a one-line refusal
    if raw == "raw wrong 0" and "lost its place" not in auto + forced:
        pytest.skip("the starved decoder was not reproduced on this machine")


def test_stderr_watch_passes_other_output_through(capfd):
    from sharp_cli.decord_read import watch_stderr

    with watch_stderr(b"MARKER") as seen:
        os.write(2, b"before\n[12:00:00] src.cc:1: ")
        os.write(2, b"MARKER text\nprogress 50%\r")
        os.write(2, b"[partial without end")
    assert [s.decode() for s in seen] == ["[12:00:00] src.cc:1: MARKER text"]
    assert capfd.readouterr().err == "before\nprogress 50%\r[partial without end"


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_forced_decord_retries_a_lost_place(vids, monkeypatch):
    import decord

    from sharp_cli.decord_read import ATTEMPTS

    real, calls = decord.VideoReader, []

    class Flaky:  # the first reader reports decord's skip failure (and returns shifted frames)
        def __init__(self, *args, **kwargs):
            self._r = real(*args, **kwargs)
            calls.append(self)

        def __getattr__(self, name):
            return getattr(self._r, name)

        def __len__(self):
            return len(self._r)

        def get_batch(self, indices):
            if len(calls) == 1:
                os.write(2, b"[00:00:00] video_reader.cc:711: Failed to skip frames effectively at frame 3.\n")
                return self._r.get_batch([i + 1 for i in indices])
            return self._r.get_batch(indices)

    monkeypatch.setattr(decord, "VideoReader", Flaky)
    clip = load_video(vids["h264"], frames=8, backend="decord")
    assert clip.backend == "decord" and frame_indices(clip.frames) == clip.indices and len(calls) == 2
    assert any("lost its place" in n and "read again" in n for n in clip.notes)
    calls.clear()
    monkeypatch.setattr(Flaky, "get_batch", lambda self, indices: (
        os.write(2, b"Failed to skip frames effectively\n"), self._r.get_batch(indices))[1])
    with pytest.raises(VideoError, match="lost its place"):
        load_video(vids["h264"], frames=8, backend="decord")
    assert len(calls) == ATTEMPTS
    import sharp_cli.video as video

    monkeypatch.setattr(video, "AUTO_ORDER", ("decord", "pyav"))
    clip = load_video(vids["h264"], frames=8)  # auto, decord first: PyAV at once
    assert clip.backend == "pyav" and frame_indices(clip.frames) == clip.indices
    assert any("lost its place" in n for n in clip.notes)


_OVERLAP = """
import os, threading
from sharp_cli.decord_read import watch_stderr
before, results = os.fstat(2), {}
entered, second_in = threading.Event(), threading.Event()

def first():
    with watch_stderr(b"MARK") as seen:
        entered.set()
        second_in.wait(1.0)  # the second block starts meanwhile, unless it must wait for this one
        os.write(2, b"MARK first\\n")
    results["first"] = len(seen)

def second():
    entered.wait()
    with watch_stderr(b"MARK") as seen:
        second_in.set()
        os.write(2, b"MARK second\\n")
    results["second"] = len(seen)

threads = [threading.Thread(target=first), threading.Thread(target=second)]
[t.start() for t in threads]
[t.join() for t in threads]
after = os.fstat(2)
os.write(2, b"still here\\n")
print((before.st_dev, before.st_ino) == (after.st_dev, after.st_ino), results["first"], results["second"])
"""


def test_two_threads_watching_stderr_at_once_leave_it_working():
    """serve decodes two videos at once: each watch swapped fd 2 for its own pipe, they restored each
    other's, and the process lost its stderr for good. Each block sees its own marker line, and
    fd 2 is the real stderr after both."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _OVERLAP], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "1"]
    assert "still here" in done.stderr and "MARK" not in done.stderr


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


def test_pyav_without_the_metadata_errors_option(vids, monkeypatch):
    # PyAV 19 removed av.open's metadata_errors: the call must still open the file, not report it broken.
    import av

    real_open = av.open

    def open_19(*args, **kwargs):
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", open_19)
    clip = load_video(vids["mkv_gop5"], frames=6, backend="pyav")
    assert len(clip.frames) == 6

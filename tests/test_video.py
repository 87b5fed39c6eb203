"""Decoding (sharp_cli/video.py) on small synthetic videos: frames, rotations, the decoders and
their fallbacks, bad input. Frame sampling, seeking and decord's lost place have their own files."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sharp_cli.errors import UsageError, VideoError
from sharp_cli.frame_sampling import sample_indices
from sharp_cli.video import VideoClip, available_backends, load_video

sys.path.insert(0, os.path.dirname(__file__))
from conftest import BACKENDS, HAS_DECORD  # noqa: E402
from videos import frame_indices, make_audio_only, make_video, truncate  # noqa: E402


@pytest.fixture
def decord_first(monkeypatch):
    """--decoder auto trying decord first, as AUTO_ORDER may say on another machine (the lead's
    measurement decides): its fallbacks to PyAV stay tested."""
    import sharp_cli.video as video

    monkeypatch.setattr(video, "AUTO_ORDER", ("decord", "pyav"))


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

"""Open a video file and sample frames from it for a video LLM.

PyAV opens every file first: that reads headers only, and turns non-videos into clear
errors before decord can crash or print FFmpeg noise on them. Frames then come from
PyAV, which seeks to the keyframe before each sampled frame so its cost follows the
number of frames sampled, not the length of the video, or from decord (batched random
access, optional, quirky): `--decoder auto` tries them in AUTO_ORDER, by measurement. User-caused
failures become one line: VideoError for the file, UsageError for the sampling arguments. `probe`
reads the header alone, so a command can check a video and estimate what it costs before decoding
any of it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from sharp_cli.decord_read import ATTEMPTS, import_decord, read_batch
from sharp_cli.errors import UsageError, VideoError, one_line
from sharp_cli.frame_sampling import check_counts, sample_indices
from sharp_cli.seek import Unseekable, decode_at

BACKENDS = ("auto", "decord", "pyav")
# The decoder --decoder auto tries first, by measurement (scripts/decoder_bench.py, docs/video.md,
# "Which decoder"): PyAV was faster on 4 of 5 clips on a 2-core CPU, and in a fresh process (one
# `sharp ask`) 127 ms against decord's 515 ms. The other one takes over when the first fails.
AUTO_ORDER = ("pyav", "decord")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# FFmpeg's still-image demuxers (png_pipe, jpeg_pipe, ..., image2) open a renamed photo
# as a one-frame video; the user almost certainly passed the wrong file.
_IMAGE_FORMAT = re.compile(r"_pipe$|^image2$")


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 (T, H, W, 3) RGB, the sampled frames only
    fps: float  # source average frame rate
    total_frames: int  # source frame count (estimated when the container doesn't say)
    indices: list[int]  # source frame index of each sampled frame, ascending
    backend: str  # "decord" or "pyav"
    path: str
    notes: list[str] = field(default_factory=list)
    key: tuple | None = None  # the file's identity and sampling, when it came through a VideoCache
    # Decoded at the exact size the model's processor makes of the full-size frames (load_video's
    # `size`): the processor keeps that size (models/qwen.py), as resizing again need not give it.
    sized: bool = False

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps

    def metadata(self) -> dict:
        """The video metadata transformers' video processors take."""
        return {"total_num_frames": self.total_frames, "fps": self.fps,
                "frames_indices": list(self.indices), "duration": self.duration}


def available_backends() -> dict[str, str | None]:
    """Installed decoder versions, None where one cannot be imported."""
    found: dict[str, str | None] = {}
    for name, load in (("decord", lambda: import_decord()), ("pyav", lambda: __import__("av"))):
        try:
            found[name] = str(load().__version__)
        except Exception:  # a broken native library raises OSError and friends too
            found[name] = None
    return found


def load_video(path: str | os.PathLike, *, frames: int | None = 32, fps: float | None = None, max_frames: int = 768,
               max_pixels: int | None = None, backend: str = "auto", size: tuple[int, int] | None = None) -> VideoClip:
    """Decode the frames sample_indices picks from a video file.

    backend: "auto" (AUTO_ORDER: PyAV, or decord if PyAV fails), "decord" or "pyav".
    max_pixels: frames are scaled down while decoding (aspect ratio kept) so that
    H*W <= max_pixels; full-size frames never pile up.
    size: (width, height) as stored to scale every frame to instead (the size the model's
    processor would resize it to, from the header: clip_budget.py); a 90/270-degree display
    rotation then turns the frames upright, (height, width).
    """
    check_sampling(frames, fps, max_frames, max_pixels, backend)
    if size is not None and not (len(size) == 2 and all(isinstance(v, int) and v >= 1 for v in size)):
        raise UsageError(f"size must be (width, height) in whole pixels, got {size!r}")
    size = tuple(size) if size is not None else None
    path = _check_path(path)
    clip = _load(path, dict(frames=frames, fps=fps, max_frames=max_frames), max_pixels, backend, size)
    clip.sized = size is not None
    used = len(clip.indices)
    if fps is None and frames is not None:  # said, not done silently
        if used < min(frames, max_frames):
            clip.notes.append(f"the video has {used} frames: all are used, fewer than the {frames} asked for")
        elif frames > max_frames:
            clip.notes.append(f"{frames} frames asked for, {used} used: --max-frames is {max_frames}")
    return clip


def _load(path: str, sampling: dict, max_pixels, backend: str, size) -> VideoClip:
    notes: list[str] = []
    if backend != "pyav" and importlib.util.find_spec("av") is None:
        return _load_decord_alone(path, sampling, max_pixels, notes, size)
    with _open(path) as container:
        stream = _video_stream(path, container)
        if backend == "pyav" or (backend == "auto" and AUTO_ORDER[0] == "pyav"):
            try:
                return _load_pyav(path, container, stream, sampling, max_pixels, notes, size)
            except VideoError as exc:  # auto: decord may read what PyAV cannot; else PyAV's words stand
                clip = None if backend == "pyav" else _try_decord(path, container, stream, sampling, max_pixels, size)
                if clip is None:
                    raise
                clip.notes.insert(0, f"PyAV failed ({str(exc).split(': ', 1)[-1]}); used decord")
                return clip
        try:
            decord = import_decord()
        except Exception as exc:
            if backend == "decord":
                raise UsageError(f"decord is not available ({_short(exc)}); install decord2 or use pyav") from exc
            notes.append("decord is not installed; used PyAV")
        else:
            try:
                return _load_decord(decord, path, container, stream, sampling, max_pixels, notes, backend, size)
            except Exception as exc:
                if backend == "decord":
                    raise _fail(path, f"decord cannot decode it ({_short(exc)})") from exc
                notes.append(f"decord failed ({_short(exc)}); used PyAV")
        return _load_pyav(path, container, stream, sampling, max_pixels, notes, size)


def _try_decord(path, container, stream, sampling, max_pixels, size) -> VideoClip | None:
    """The clip as decord reads it, or None when it cannot (auto mode, after PyAV failed)."""
    try:
        return _load_decord(import_decord(), path, container, stream, sampling, max_pixels, [], "auto", size)
    except Exception:  # noqa: BLE001 - PyAV's error is the one to report
        return None


@dataclass
class VideoInfo:
    """What a video's header says, read without decoding a frame (for estimates before decoding)."""

    path: str
    width: int  # as stored (a 90-degree display rotation swaps them; token counts barely change)
    height: int
    fps: float
    total_frames: int  # estimated from the duration when the container does not say; 0: unknown

    def sampled_frames(self, frames: int | None = 32, fps: float | None = None, max_frames: int = 768) -> int:
        return len(sample_indices(self.total_frames, self.fps, frames=frames, fps=fps, max_frames=max_frames))

    def decoded_size(self, max_pixels: int | None) -> tuple[int, int]:
        """(width, height) of the frames load_video returns for this max_pixels."""
        return _target_size(self.width, self.height, max_pixels) or (self.width, self.height)


def probe(path: str | os.PathLike) -> VideoInfo | None:
    """The header of a video (PyAV, no frame decoded): the same one-line VideoError as load_video
    for a missing, empty or non-video file. None without PyAV (decord reads nothing this cheaply)."""
    path = _check_path(path)
    if importlib.util.find_spec("av") is None:
        return None
    with _open(path) as container:
        stream = _video_stream(path, container)
        rate = _frame_rate(stream)
        if rate is None or not stream.width or not stream.height:
            return None
        total, _ = _frame_count(container, stream, rate, count_packets=False)
        return VideoInfo(path, int(stream.width), int(stream.height), float(rate), int(total))


def check_sampling(frames=32, fps=None, max_frames=768, max_pixels=None, backend="auto") -> None:
    """load_video's argument checks alone (UsageError), so a command can make them first."""
    check_counts(frames, fps, max_frames)
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"max_pixels must be at least 1 (got {max_pixels})")
    if backend not in BACKENDS:
        raise UsageError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _fail(path: str, reason: str) -> VideoError:
    return VideoError(one_line(f"cannot read video '{path}': {reason}"))  # one_line: paths may hold newlines


def _short(exc: BaseException) -> str:
    """An exception as a short phrase, without decord's '[time] /src/file.cc:123: ' (nested)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", one_line(text))
    return text if len(text) <= 160 else text[:157] + "..."


def _check_path(path: str | os.PathLike) -> str:
    path = os.fsdecode(path)
    if _URL.match(path):
        raise _fail(path, "URLs are not supported; download the file first")
    if not os.path.exists(path):
        raise _fail(path, "file not found")
    if os.path.isdir(path):
        raise _fail(path, "it is a directory, not a video file")
    if not os.path.isfile(path):
        raise _fail(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as exc:  # PermissionError, mostly
        raise _fail(path, exc.strerror or str(exc)) from exc
    if empty:
        raise _fail(path, "the file is empty (0 bytes)")
    return path


def _open(path: str):
    import av

    try:
        try:
            return av.open(path, metadata_errors="ignore")
        except TypeError:  # PyAV 19 removed the option: it opens without it
            return av.open(path)
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise _fail(path, f"not a video file, or truncated or corrupted ({_short(exc)})") from exc


def _video_stream(path: str, container):
    if _IMAGE_FORMAT.search(container.format.name):
        raise _fail(path, f"it is a still image ({container.format.name.removesuffix('_pipe')}), not a video")
    if not container.streams.video:
        raise _fail(path, "no video stream found (is it an audio-only file?)")
    return container.streams.video[0]


def _target_size(width: int, height: int, max_pixels: int | None, size=None) -> tuple[int, int] | None:
    """(width, height) scaled to at most max_pixels (or to `size` when given); None when already
    small enough."""
    if size is not None:
        return None if tuple(size) == (width, height) else tuple(size)
    if not max_pixels or width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    w = max(1, int(width * scale))
    h = max(1, min(int(height * scale), max_pixels // w))  # min(): when w was clamped to 1
    return min(w, max_pixels // h), h


def _frame_rate(stream) -> Fraction | None:
    rates = (stream.average_rate, stream.guessed_rate, stream.base_rate)
    return next((Fraction(rate) for rate in rates if rate and rate > 0), None)


def _frame_count(container, stream, rate: Fraction, count_packets: bool = True) -> tuple[int, str | None]:
    """The frame count (0: unknown, if not counting packets) and a note if estimated."""
    if stream.frames > 0:
        return stream.frames, None
    # WebM/VP9 and some MKV leave the count out, but their durations are reliable.
    if stream.duration and stream.time_base:
        seconds = stream.duration * stream.time_base
    else:
        seconds = Fraction(container.duration or 0, 1_000_000)  # in av.time_base
    if seconds:
        return max(1, round(seconds * rate)), "frame count estimated from the duration"
    if not count_packets:
        return 0, None
    # Last resort, for raw streams: demuxing without decoding is fast even for long files.
    count = sum(1 for packet in container.demux(stream) if packet.size)
    return max(1, count), "frame count from counting packets (no duration in the file)"


def _load_decord(decord, path, container, stream, sampling, max_pixels, notes, backend, exact=None) -> VideoClip:
    # decord scales while decoding, to the size computed from PyAV's header. It applies
    # 180-degree display rotations itself; decord2 3.4 fails on 90/270 (PyAV takes over).
    size = _target_size(stream.width, stream.height, max_pixels, exact)
    w, h = size or (stream.width, stream.height)
    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg prints to stderr; errors still raise
    # One decoder thread: with decord2's threaded decoder, a busy CPU makes its frame skipping give
    # up ("did not respond after 10000 attempts") and return the wrong frames without an error
    # (6 of 18 runs wrong with 3 processes at once, 0 of 18 with num_threads=1). Heavier load still
    # does it (4 of 40 runs with 6 CPU burners on 2 cores); read_batch notices and refuses the batch.
    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w if size else -1, height=h if size else -1,
                            num_threads=1)
    total, fps = len(vr), float(vr.get_avg_fps())
    if total < 1 or not fps > 0:
        raise RuntimeError(f"it reports {total} frames at {fps} fps")
    # decord counts the frames it can reach, so a truncated file just looks short. On the
    # damaged tail it fails at random (~10% of runs), so auto mode hands such files to PyAV.
    rate = _frame_rate(stream)
    promised = _frame_count(container, stream, rate, count_packets=False)[0] if rate else 0
    if total < promised * 0.98 - 1:
        if backend == "auto":
            raise RuntimeError(f"the file looks truncated, {total} of {promised} frames")
        notes.append(f"the video ends at frame {total}, not {promised} as its header says (truncated?)")
    indices = sample_indices(total, fps, **sampling)
    # Auto mode hands a skip failure to PyAV at once; forced decord tries fresh readers first.
    frames, lost = read_batch(vr, indices, lambda: decord.VideoReader(
        path, ctx=decord.cpu(0), width=w if size else -1, height=h if size else -1, num_threads=1),
        attempts=1 if backend == "auto" else ATTEMPTS)
    notes += [f"decord lost its place while skipping frames ({lost}x, busy CPU); read again"] if lost else []
    if frames.shape != (len(indices), h, w, 3) or frames.dtype != np.uint8:
        raise RuntimeError(f"it returned frames of shape {frames.shape}, not {(len(indices), h, w, 3)}")
    return VideoClip(frames, fps, total, indices, "decord", path, notes)


def _load_decord_alone(path, sampling, max_pixels, notes, exact=None) -> VideoClip:
    """Without PyAV (a minimal install): decord reads the header too, with its own errors."""
    try:
        decord = import_decord()
    except Exception as exc:
        raise VideoError(f"no video decoder is installed ({_short(exc)}); pip install av or decord2") from None
    decord.logging.set_level(decord.logging.QUIET)
    try:
        probe = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        height, width = probe[0].shape[:2]
        size = _target_size(width, height, max_pixels, exact)
        w, h = size or (width, height)
        vr = probe if size is None else decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h, num_threads=1)
        total, fps = len(vr), float(vr.get_avg_fps())
        if total < 1 or not fps > 0:
            raise RuntimeError(f"it reports {total} frames at {fps} fps")
        indices = sample_indices(total, fps, **sampling)
        frames, lost = read_batch(vr, indices, lambda: decord.VideoReader(
            path, ctx=decord.cpu(0), width=w, height=h, num_threads=1), attempts=ATTEMPTS)
        notes += [f"decord lost its place while skipping frames ({lost}x, busy CPU); read again"] if lost else []
    except (UsageError, VideoError):
        raise
    except Exception as exc:
        raise _fail(path, f"decord cannot decode it ({_short(exc)}); PyAV is not installed") from None
    if frames.shape != (len(indices), h, w, 3):
        raise _fail(path, f"decord returned frames of shape {frames.shape}; PyAV is not installed")
    return VideoClip(frames, fps, total, indices, "decord", path, notes)


def _load_pyav(path, container, stream, sampling, max_pixels, notes, exact=None) -> VideoClip:
    import av

    rate = _frame_rate(stream)
    if rate is None:
        raise _fail(path, "the video stream has no frame rate")
    total, note = _frame_count(container, stream, rate)
    notes += [note] if note else []

    def decode(indices):
        try:
            try:
                size = _target_size(stream.width, stream.height, max_pixels, exact)
                return decode_at(container, stream, indices, rate, size, seek=True)
            except Unseekable:
                pass
            # Raw streams (.h264) and the like: count frames from the start of a fresh read.
            note = "cannot seek in this file; decoded it from the start"
            notes.extend([note] if note not in notes else [])
            with _open(path) as fresh:
                again = fresh.streams.video[0]
                size = _target_size(again.width, again.height, max_pixels, exact)
                return decode_at(fresh, again, indices, rate, size, seek=False)
        except (av.error.FFmpegError, ValueError, OSError) as exc:  # damage beyond skipping
            raise _fail(path, f"decoding failed ({_short(exc)})") from exc

    got, frames, end, damaged = decode(sample_indices(total, float(rate), **sampling))
    if end is not None:
        # Fewer frames than the header (or the duration estimate) promised: sample again
        # within the frames that exist, so the clip spans all of the readable part.
        notes.append(f"the video ends at frame {end}, not {total} as its header says (truncated?)")
        total = end
        indices = sample_indices(total, float(rate), **sampling)
        again = decode(indices) if indices != got else ([],)
        if len(again[0]) > len(got):
            got, frames, _, damaged = again
    if damaged:
        notes.append(f"skipped {damaged} damaged packet(s)")
    if not got:
        raise _fail(path, "no frame could be decoded (the file is truncated or corrupted)")
    return VideoClip(np.stack(frames), float(rate), total, got, "pyav", path, notes)

"""Open a video file and sample frames from it for a video LLM.

Two decoders: decord (fast batched random access, but optional and quirky) and PyAV
(always installed). PyAV opens every file first: it is cheap (headers only) and turns
non-videos into clear errors before decord can print FFmpeg noise or crash on them.
The PyAV reader seeks to the keyframe before each sampled frame, so its cost follows
the number of sampled frames, not the length of the video.

Every failure the user can cause becomes one line: VideoError for the file,
UsageError for the sampling arguments.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from sharp_cli.errors import UsageError, VideoError, one_line

BACKENDS = ("auto", "decord", "pyav")

# Targets closer than this to the last decoded frame are reached by decoding forward:
# a seek would land on the same or an earlier keyframe and redo that work.
SEEK_GAP_SECONDS = 2.0

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# FFmpeg's still-image demuxers ("png_pipe", "jpeg_pipe", ..., "image2") happily open
# a renamed photo as a one-frame "video"; the user almost certainly passed the wrong file.
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

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps

    def metadata(self) -> dict:
        """Video metadata in the form transformers' video processors take."""
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "frames_indices": list(self.indices),
            "duration": self.duration,
        }


def available_backends() -> dict[str, str | None]:
    """Installed decoder versions, None where a decoder cannot be imported."""
    found: dict[str, str | None] = {}
    for name, module in (("decord", "decord"), ("pyav", "av")):
        try:
            found[name] = str(__import__(module).__version__)
        except Exception:  # a broken native library raises OSError and friends, not ImportError
            found[name] = None
    return found


def sample_indices(
    total_frames: int,
    source_fps: float,
    *,
    frames: int | None = 32,
    fps: float | None = None,
    max_frames: int = 768,
) -> list[int]:
    """Frame indices to sample, sorted, unique, in [0, total_frames).

    fps given: one frame every 1/fps seconds (the centre of each interval); when that
    would exceed max_frames, max_frames frames spread uniformly over the whole video.
    Otherwise `frames` frames, the centre of each of `frames` equal bins (frames=None:
    every frame). Both modes are capped at max_frames, and a video shorter than the
    request gives all of its frames.
    """
    _check_sampling(frames, fps, max_frames)
    if total_frames < 0 or not source_fps > 0:
        raise ValueError(f"bad source: total_frames={total_frames}, source_fps={source_fps}")
    if total_frames == 0:
        return []
    if fps is not None:
        if fps >= source_fps:  # at least one sample per source frame: all of them
            count = total_frames
        else:
            step = source_fps / fps  # > 1 source frames per sample, so floors never repeat
            count = max(1, math.ceil(total_frames / step - 0.5))
            if count <= max_frames:
                return [min(int((j + 0.5) * step), total_frames - 1) for j in range(count)]
    else:
        count = total_frames if frames is None else frames
    count = min(count, max_frames)
    if total_frames <= count:
        return list(range(total_frames))
    # Integer arithmetic: the same indices on every platform.
    return [(2 * k + 1) * total_frames // (2 * count) for k in range(count)]


def load_video(
    path: str | os.PathLike,
    *,
    frames: int | None = 32,
    fps: float | None = None,
    max_frames: int = 768,
    max_pixels: int | None = None,
    backend: str = "auto",
) -> VideoClip:
    """Decode the sampled frames of a video file (see sample_indices for the sampling).

    backend: "auto" (decord, falling back to PyAV if decord is missing or fails),
    "decord" or "pyav". max_pixels: each frame is downscaled while it is decoded so
    that H*W <= max_pixels (aspect ratio kept), so full-size frames never pile up.
    """
    _check_sampling(frames, fps, max_frames)
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"max_pixels must be at least 1 (got {max_pixels})")
    if backend not in BACKENDS:
        raise UsageError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = _check_path(path)
    sampling = dict(frames=frames, fps=fps, max_frames=max_frames)
    notes: list[str] = []
    with _open(path) as container:
        stream = _video_stream(path, container)
        if backend != "pyav":
            try:
                import decord
            except Exception as exc:
                if backend == "decord":
                    raise UsageError(f"the decord backend is not available ({_short(exc)}); install decord2 or use the pyav backend") from None
                notes.append("decord is not installed; used PyAV")
            else:
                try:
                    return _load_decord(decord, path, stream, sampling, max_pixels, notes)
                except Exception as exc:
                    if backend == "decord":
                        raise _fail(path, f"decord cannot decode it ({_short(exc)})") from None
                    notes.append(f"decord failed ({_short(exc)}); used PyAV")
        return _load_pyav(path, container, stream, sampling, max_pixels, notes)


def _check_sampling(frames, fps, max_frames) -> None:
    if frames is not None and frames < 1:
        raise UsageError(f"frames must be at least 1 (got {frames})")
    if fps is not None and not fps > 0:  # `not >` also rejects NaN
        raise UsageError(f"fps must be greater than 0 (got {fps})")
    if max_frames < 1:
        raise UsageError(f"max_frames must be at least 1 (got {max_frames})")


def _fail(path: str, reason: str) -> VideoError:
    return VideoError(one_line(f"cannot read video '{path}': {reason}"))


def _short(exc: BaseException) -> str:
    """An exception as a short phrase: decord prefixes '[time] /src/file.cc:123: '."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", one_line(text))
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
        raise _fail(path, exc.strerror or str(exc)) from None
    if empty:
        raise _fail(path, "the file is empty (0 bytes)")
    return path


def _open(path: str):
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise _fail(path, f"not a video file, or truncated or corrupted ({_short(exc)})") from None


def _video_stream(path: str, container):
    if _IMAGE_FORMAT.search(container.format.name):
        kind = container.format.name.removesuffix("_pipe")
        raise _fail(path, f"it is a still image ({kind}), not a video")
    if not container.streams.video:
        raise _fail(path, "no video stream found (is it an audio-only file?)")
    return container.streams.video[0]


def _target_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) scaled down to at most max_pixels, or None when no resize is needed."""
    if not max_pixels or width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # only when a side was clamped to 1
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _load_decord(decord, path, stream, sampling, max_pixels, notes) -> VideoClip:
    # PyAV already read the coded size, so decord can scale while it decodes. It also
    # applies 180-degree display rotation itself (decord2 3.4 crashes on 90/270, which
    # sends those files to PyAV).
    size = _target_size(stream.width, stream.height, max_pixels)
    w, h = size or (stream.width, stream.height)
    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w if size else -1, height=h if size else -1)
    total, fps = len(vr), float(vr.get_avg_fps())
    if total < 1 or not fps > 0:
        raise RuntimeError(f"reports {total} frames at {fps} fps")
    indices = sample_indices(total, fps, **sampling)
    batch = vr.get_batch(indices)
    vr.seek(0)  # otherwise decord keeps decoder buffers from the batch alive (known leak)
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    if frames.shape != (len(indices), h, w, 3) or frames.dtype != np.uint8:
        raise RuntimeError(f"returned frames of shape {frames.shape}, expected {(len(indices), h, w, 3)}")
    return VideoClip(frames, fps, total, indices, "decord", path, notes)


def _frame_rate(stream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return None


def _frame_count(container, stream, rate: Fraction) -> tuple[int, str | None]:
    """Frame count, and a note when it had to be estimated."""
    if stream.frames > 0:
        return stream.frames, None
    # WebM/VP9 and some MKV leave the count out; their durations are reliable.
    if stream.duration and stream.time_base:
        seconds = stream.duration * stream.time_base
    elif container.duration:
        seconds = Fraction(container.duration, 1_000_000)  # av.time_base
    else:
        seconds = None
    if seconds:
        return max(1, round(seconds * rate)), "frame count estimated from the duration"
    # Last resort: count packets; demuxing without decoding is fast even for long files.
    count = sum(1 for packet in container.demux(stream) if packet.size)
    return max(1, count), "frame count from counting packets (no duration in the file)"


class _NoTimestamps(Exception):
    """A decoded frame has no timestamp, so its position after a seek is unknown."""


def _load_pyav(path, container, stream, sampling, max_pixels, notes) -> VideoClip:
    rate = _frame_rate(stream)
    if rate is None:
        raise _fail(path, "the video stream has no frame rate")
    total, note = _frame_count(container, stream, rate)
    notes += [note] if note else []
    indices = sample_indices(total, float(rate), **sampling)
    stream.thread_type = "AUTO"  # frame + slice threads; output is identical to single-threaded
    import av

    try:
        try:
            got, frames, end, damaged = _decode_at(container, stream, indices, rate, max_pixels, seek=True)
        except _NoTimestamps:
            # Without timestamps only counting from the start tells which frame is which.
            notes.append("frames have no timestamps; decoded from the start")
            container.seek(0)
            got, frames, end, damaged = _decode_at(container, stream, indices, rate, max_pixels, seek=False)
    except (av.error.FFmpegError, ValueError, OSError) as exc:  # seek or scaler failures: still a bad file
        raise _fail(path, f"decoding failed ({_short(exc)})") from exc
    if damaged:
        notes.append(f"skipped {damaged} damaged packet(s)")
    if not got:
        raise _fail(path, "no frame could be decoded (the file is truncated or corrupted)")
    if end is not None:  # ran out of frames before the last target
        notes.append(f"the video ended at frame {end} of the expected {total}; got {len(got)} of {len(indices)} frames")
        total = end
    return VideoClip(np.stack(frames), float(rate), total, got, "pyav", path, notes)


def _decode_at(container, stream, indices, rate, max_pixels, *, seek: bool):
    """Decode the frames at `indices`: (indices got, frames, frame count if the stream
    ended early else None, damaged packets skipped)."""
    import av

    time_base = stream.time_base
    start = stream.start_time or 0
    gap = max(1, int(SEEK_GAP_SECONDS * rate))
    size = _target_size(stream.width, stream.height, max_pixels)
    damaged = [0]  # mutable, so the decoding generator can count into it

    def decoded():
        try:
            for packet in container.demux(stream):
                try:
                    yield from stream.decode(packet)
                except av.error.FFmpegError:  # a damaged packet: skip it, like ffmpeg does
                    damaged[0] += 1
        except av.error.FFmpegError:  # the demuxer hit a damaged or missing part: stop there
            damaged[0] += 1

    def position(frame, previous):
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            if seek:
                raise _NoTimestamps
            return previous + 1
        # Round to the nearest frame slot: timestamps jitter by a tick or two in some muxers.
        return round((pts - start) * time_base * rate)

    got, frames = [], []
    source, pos = iter(decoded()), -1  # pos: index of the last frame decoded
    for target in indices:
        if seek and (not got or target - pos > gap):
            container.seek(start + int(target / rate / time_base), stream=stream, backward=True, any_frame=False)
            source = iter(decoded())
        for frame in source:
            pos = position(frame, pos)
            if pos >= target:
                break
        else:
            return got, frames, pos + 1, damaged[0]
        # One size for the whole clip, even if the stream changes resolution midway.
        size = size or (frame.width, frame.height)
        frames.append(_to_rgb(frame, size))
        got.append(target)
    return got, frames, None, damaged[0]


def _to_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    # Scaling inside the colour conversion (swscale) costs less than converting first.
    rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
    # frame.rotation: counter-clockwise degrees from the display matrix, the turn the
    # player applies to show the frame upright; np.rot90 turns counter-clockwise too.
    # Mirroring in the matrix is not exposed by PyAV 18 and is ignored.
    turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

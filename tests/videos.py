"""Tiny synthetic test videos, encoded with PyAV, whose frames say which frame they are.

Each frame of pattern "index" shows its own frame index as a 4x4 grid of black/white
cells (16 bits, most significant bit top-left, row by row). Hard-edged black/white
cells survive lossy codecs, chroma subsampling and downscaling far better than a
grey level, so `frame_index` can read the index back exactly from any decoded frame.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

GRID = 4  # cells per side; 16 bits is plenty for the 3-hour test video (10800 frames)
BITS = GRID * GRID


def _cell_edges(length: int) -> np.ndarray:
    return np.linspace(0, length, GRID + 1).round().astype(int)


def pattern_frame(index: int, width: int, height: int, pattern: str = "index") -> np.ndarray:
    """RGB uint8 frame (height, width, 3) for frame `index`."""
    if pattern == "black":
        return np.zeros((height, width, 3), np.uint8)
    if pattern != "index":
        raise ValueError(f"unknown pattern {pattern!r}")
    if not 0 <= index < 2**BITS:
        raise ValueError(f"frame index {index} does not fit in {BITS} bits")
    bits = ((index >> np.arange(BITS - 1, -1, -1)) & 1).astype(np.uint8).reshape(GRID, GRID) * 255
    # Cell row/column of every pixel row/column (cells differ by a pixel for odd sizes).
    rows = np.searchsorted(_cell_edges(height), np.arange(height), side="right") - 1
    cols = np.searchsorted(_cell_edges(width), np.arange(width), side="right") - 1
    return np.repeat(bits[rows][:, cols, None], 3, axis=2)


def frame_index(frame: np.ndarray) -> int:
    """Read the index back from a decoded (possibly resized) RGB frame."""
    grey = np.asarray(frame, dtype=np.float32).mean(axis=2)
    h, w = grey.shape
    ys, xs = _cell_edges(h), _cell_edges(w)
    index = 0
    for bit in range(BITS):
        r, c = divmod(bit, GRID)
        y0, y1, x0, x1 = ys[r], ys[r + 1], xs[c], xs[c + 1]
        # The cell's centre only: edges bleed into neighbours after compression/resizing.
        dy, dx = max((y1 - y0) // 4, 0), max((x1 - x0) // 4, 0)
        cell = grey[y0 + dy : max(y1 - dy, y0 + dy + 1), x0 + dx : max(x1 - dx, x0 + dx + 1)]
        index = index << 1 | int(cell.mean() > 127)
    return index


def frame_indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


_CODEC_OPTIONS = {
    # Near-lossless and fast: the tests care about content, not file size.
    "libx264": {"preset": "ultrafast", "crf": "12"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0"},
    "mpeg4": {"qscale": "2"},
}


def make_video(
    path: str | os.PathLike,
    n_frames: int = 40,
    fps: float = 10,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    pattern: str = "index",
    *,
    gop: int | None = None,
    rotation: int = 0,
    pix_fmt: str | None = None,
    container_options: dict[str, str] | None = None,
    codec_options: dict[str, str] | None = None,
) -> str:
    """Encode `n_frames` frames of `size` (width, height) at `fps`; returns the path.

    rotation: counter-clockwise degrees written as the stream's display matrix
    (what VideoFrame.rotation reads back); the pixels themselves are not rotated.
    Odd sizes: libx264/libvpx-vp9 get yuv444p (yuv420p needs even dimensions);
    mpeg4 cannot encode odd sizes at all. codec_options override the fast defaults
    (e.g. {"preset": "medium"} for an H.264 stream with B-frames).
    """
    import av

    path = os.fspath(path)
    width, height = size
    if pix_fmt is None:
        pix_fmt = "yuv444p" if (width % 2 or height % 2) and codec != "mpeg4" else "yuv420p"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate, options={**_CODEC_OPTIONS.get(codec, {}), **(codec_options or {})})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height, pattern), format="rgb24")
            frame.pts = i  # in the codec's time base, 1/rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def make_long_video(path: str | os.PathLike, hours: float = 3.0, fps: float = 1, size=(64, 48), gop: int = 300) -> str:
    """A long, tiny video: 3 h at 1 fps = 10800 frames, encoded in about a second.

    64x48 rather than 16x16: decord2 3.4 fails on frame widths such as 16, 24, 32, 48
    and 96 (PyAV takes over in auto mode), and this video should exercise both backends.
    """
    return make_video(path, int(hours * 3600 * fps), fps, size, gop=gop)


def make_audio_only(path: str | os.PathLike, seconds: float = 1.0, rate: int = 8000) -> str:
    """An .mp4 (or whatever the suffix says) with one AAC audio stream and no video."""
    import av

    path = os.fspath(path)
    with av.open(path, "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        t = np.arange(n, dtype=np.float32) / rate
        tone = (0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
        chunk = 1024
        for start in range(0, n, chunk):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + chunk], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def truncate(src: str | os.PathLike, dst: str | os.PathLike, fraction: float = 0.5) -> str:
    """Copy the first `fraction` of src's bytes to dst, like an interrupted download."""
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return os.fspath(dst)

"""Which frames of a video to sample: pure arithmetic on the frame count and rate, no decoding.

video.load_video decodes the frames sample_indices picks; keeping the choice apart lets it be
tested exhaustively (tests/test_frame_sampling.py) and used before any file is opened.
"""

from __future__ import annotations

import math

from sharp_cli.errors import UsageError


def sample_indices(total_frames: int, source_fps: float, *, frames: int | None = 32, fps: float | None = None,
                   max_frames: int = 768) -> list[int]:
    """Frame indices to sample: sorted, unique, in [0, total_frames).

    fps given: one frame every 1/fps seconds (the centre of each interval); if that is
    more than max_frames, max_frames frames spread uniformly over the whole video.
    Else `frames` frames, the centre of each of `frames` equal bins (None: every frame),
    also capped at max_frames. A video with fewer frames than asked gives all of them.
    """
    check_counts(frames, fps, max_frames)
    if total_frames < 0 or not source_fps > 0:
        raise ValueError(f"bad source: total_frames={total_frames}, source_fps={source_fps}")
    if total_frames == 0:
        return []
    count = total_frames if frames is None else frames
    if fps is not None:
        step = source_fps / fps
        count = total_frames  # fps at or above the source rate: every frame
        if step > 1:  # more than one frame per sample, so the floors never repeat
            count = max(1, math.ceil(total_frames / step - 0.5))
            if count <= max_frames:
                return [min(int((j + 0.5) * step), total_frames - 1) for j in range(count)]
    count = min(count, max_frames)
    if total_frames <= count:
        return list(range(total_frames))
    # Integer arithmetic: the same indices on every platform.
    return [(2 * k + 1) * total_frames // (2 * count) for k in range(count)]


def check_counts(frames, fps, max_frames) -> None:
    """UsageError unless frames (None: every frame) and max_frames are >= 1 and fps (None: off) is > 0."""
    if frames is not None and frames < 1:
        raise UsageError(f"--frames must be at least 1 (got {frames})")
    if fps is not None and not fps > 0:  # `not >` rejects NaN too
        raise UsageError(f"--fps must be greater than 0 (got {fps})")
    if max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1 (got {max_frames})")

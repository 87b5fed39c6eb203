"""Frame sampling (sharp_cli/frame_sampling.py): which frames a clip takes, and its arguments' checks."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sharp_cli.errors import UsageError
from sharp_cli.frame_sampling import sample_indices
from sharp_cli.video import load_video

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

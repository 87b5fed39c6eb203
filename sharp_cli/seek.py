"""Sample frames with PyAV by seeking, so the cost follows the frames sampled, not the video's length.

Before each target frame, seek to the keyframe before it (unless one is not worth it: the target
is close, or no keyframe lies between), decode forward to the target, convert and scale it in one
pass. Formats whose seeks land anywhere (MPEG-TS) are walked back until the target is reached;
streams without timestamps raise Unseekable, and the caller decodes them from the start instead.
"""

from __future__ import annotations

import itertools

import numpy as np

# Targets this close to the last decoded frame are reached by decoding forward: a seek
# would most likely land on the same keyframe and redo the work.
SEEK_GAP_SECONDS = 2.0


class Unseekable(Exception):
    """Seeking fails, or frames carry no timestamps to tell where a seek landed."""


def decode_at(container, stream, indices, rate, size, *, seek: bool):
    """Decode the frames at `indices` (ascending), scaled to `size` (width, height; None: as
    stored): (indices got, frames, the frame count if the stream ended before the last target
    else None, damaged packets skipped)."""
    import av

    if not stream.codec_context.is_open:  # settable only before the first decode
        stream.thread_type = "AUTO"  # frame + slice threads; the output is the same
    time_base, start = stream.time_base, stream.start_time or 0
    entries = stream.index_entries  # keyframes: complete for mp4, the cues for mkv/webm
    gap = max(1, int(SEEK_GAP_SECONDS * rate))
    damaged, pos, pos_pts = 0, -1, None  # pos, pos_pts: the last frame decoded

    def timestamp(index: int) -> int:
        return start + int(index / rate / time_base)

    def decoded():
        nonlocal damaged
        try:
            for packet in container.demux(stream):
                try:
                    yield from stream.decode(packet)
                except av.error.FFmpegError:  # a damaged packet: skip it, as ffmpeg does
                    damaged += 1
        except av.error.FFmpegError:  # the demuxer hit a damaged or missing part: stop there
            damaged += 1

    def position(frame) -> int:
        nonlocal pos, pos_pts
        pos_pts = frame.pts if frame.pts is not None else frame.dts
        if pos_pts is None:
            if seek:
                raise Unseekable
            pos += 1
        else:  # the nearest frame slot: some muxers jitter timestamps by a tick
            pos = round((pos_pts - start) * time_base * rate)
        return pos

    def worth_seeking(target: int) -> bool:
        """A seek saves work only if a keyframe lies between here and the target."""
        if pos < 0:
            return True
        if target - pos <= gap:
            return False
        ts, n = timestamp(target), len(entries)
        if not n or entries[n - 1].timestamp < ts:  # the index hasn't been read that far
            return True
        key = entries.search_timestamp(ts, backward=True)
        return key < 0 or entries[key].timestamp > pos_pts

    def seek_to(target: int):
        back = 0
        while True:
            at = max(target - back, 0)
            try:
                container.seek(timestamp(at), stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError as exc:
                raise Unseekable from exc
            frames = decoded()
            first = next(frames, None)
            if first is None or at == 0 or position(first) <= target:
                return itertools.chain([first] if first is not None else [], frames)
            # Formats without an index (MPEG-TS) land on any packet, and the decoder
            # drops frames up to the next keyframe, which may be past the target.
            back = max(2 * back, int(rate), 1)

    got, out, source = [], [], decoded()
    for target in indices:
        if seek and worth_seeking(target):
            source = seek_to(target)
        for frame in source:
            if position(frame) >= target:
                break
        else:
            return got, out, pos + 1, damaged
        size = size or (frame.width, frame.height)  # one size, even if the stream changes
        out.append(to_rgb(frame, size))
        got.append(target)
    return got, out, None, damaged


def to_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    # Scaling inside the colour conversion (one swscale pass) is cheap even for 4K frames.
    rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
    # frame.rotation: the display matrix's counter-clockwise turn that shows the frame
    # upright; np.rot90 turns counter-clockwise too. PyAV 18 doesn't expose the
    # matrix's mirroring, so mirrored videos stay mirrored.
    turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

"""Needle recall@k: which visual tokens show the answer, and how many of them a method kept.

An item may carry `needle_boxes`: [frame, x0, y0, x1, y1] boxes in the clip's own pixels (end
exclusive; `sharp synth` writes them) that show what the answer hangs on. A box marks every visual
token it overlaps:

- in time: source frame `frame` is visible only if it was sampled (VideoClip.indices); the j-th
  sampled frame goes into token frame j // frames_per_step (Qwen2/2.5/3-VL put 2 consecutive
  sampled frames into one token frame; LLaVA-OneVision 1);
- in space: every supported family resizes the whole frame to its input size (no crop, no pad)
  and cuts it into a regular h x w grid of tokens (Qwen: 28-pixel cells after the resize, 14-px
  patches merged 2x2; LLaVA-OneVision: its 27x27 patch grid pooled to 14x14), so token row r
  covers rows [r H / h, (r + 1) H / h) of the clip's H pixel rows, whatever the resize.

The grid and frames_per_step come from the model's VisualLayout; a family whose processor crops,
or whose token frames do not match the sampled frames, is not mapped (recall stays unknown).
recall@k of one answer = needle tokens kept / needle tokens, k being the kept count.
"""

from __future__ import annotations

from sharp_cli.errors import SharpError


def check_boxes(boxes, where: str) -> list[list[int]] | None:
    """An item's needle_boxes as lists of 5 ints, or None when it has none; SharpError if malformed."""
    if boxes is None:
        return None
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    ok = isinstance(boxes, list) and all(
        isinstance(b, list) and len(b) == 5 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in b) for b in boxes)
    if not ok:
        raise SharpError(f"{where}: needle_boxes must be a list of [frame, x0, y0, x1, y1] boxes")
    return [[int(v) for v in b] for b in boxes]


def mappable(processor) -> bool:
    """Whether this processor keeps the whole frame (resize only): then boxes map onto the grid."""
    vp = getattr(processor, "video_processor", None)
    return vp is not None and not getattr(vp, "do_center_crop", False)


def token_numbers(boxes, frame_size: tuple[int, int], sampled: list[int], grid: tuple[int, int, int],
                  frames_per_step: int) -> list[int] | None:
    """Sorted visual token numbers (frame-major, then row, then column, as VisualLayout orders them)
    that any box overlaps. frame_size: (width, height) of the pixels the boxes are in; sampled:
    source frame index of each sampled frame, ascending. None when the grid does not match the
    sampled frames (a layout this mapping does not know)."""
    t, h, w = grid
    width, height = frame_size
    if t != -(-len(sampled) // frames_per_step) or width < 1 or height < 1 or h < 1 or w < 1:
        return None
    position = {frame: j for j, frame in enumerate(sampled)}
    found = set()
    for frame, x0, y0, x1, y1 in boxes:
        j = position.get(frame)
        x0, x1 = max(0, x0), min(width, x1)
        y0, y1 = max(0, y0), min(height, y1)
        if j is None or x1 <= x0 or y1 <= y0:
            continue  # not sampled, or nothing of it inside the frame
        step = j // frames_per_step
        # Cell r covers [r*H/h, (r+1)*H/h): it overlaps [y0, y1) iff y0*h < (r+1)*H and y1*h > r*H.
        rows = range(y0 * h // height, -(-y1 * h // height))
        cols = range(x0 * w // width, -(-x1 * w // width))
        found.update(step * h * w + r * w + c for r in rows for c in cols)
    return sorted(found)


def recall(needle: list[int] | None, kept: list[int] | None) -> float | None:
    """Share of the needle tokens that were kept; None when unknown or there is no needle token."""
    if not needle or kept is None:
        return None
    return len(set(needle) & set(kept)) / len(needle)

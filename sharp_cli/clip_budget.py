"""A video decoded no larger than the model keeps, and refused when it cannot fit the model.

`sharp ask`, `sharp serve` and `sharp batch` share these steps: from the video's header (no frame
decoded) they estimate what the clip becomes (models/budget.py) and refuse, in one line naming what
to lower, a clip over --max-visual-tokens or a prompt over the model's context; the frames are
decoded at most at the model's per-frame pixel budget (so 32 frames of 8K never sit in memory at
full size); once decoded, the check is made again with the frames as they came.
"""

from __future__ import annotations

from dataclasses import dataclass

from sharp_cli.models import budget

# Frames up to this many times the pixels the processor keeps are decoded as stored and resized by
# the processor, as before (sharp-tiny's 128-pixel synthetic frames, which it keeps at 112, among
# them); larger ones are decoded at the processor's size.
DECODE_MARGIN = 2


@dataclass(frozen=True)
class ClipBudget:
    adapter: object  # the model family's adapter
    config: object  # the model's config (its vision config and context length)
    saved: int | None = None  # the upper bound its video processor was saved with (budget.saved_bound)

    @classmethod
    def of(cls, loaded) -> "ClipBudget":
        """The budget of a loaded model, with its processor's own bound."""
        video_processor = getattr(loaded.processor, "video_processor", None)
        return cls(loaded.adapter, loaded.model.config, budget.saved_bound(video_processor))

    def check(self, frames: int, height: int, width: int, **limits) -> budget.Estimate:
        """budget.check for `frames` frames of height x width; limits: max_pixels, question,
        max_new_tokens, max_visual_tokens."""
        return budget.check(self.adapter, self.config, frames, height, width, saved=self.saved, **limits)

    def plan(self, info, video: dict, **limits) -> dict:
        """load_video's keyword arguments (`video`: frames, fps, max_frames, max_pixels, backend) for
        the video whose header is `info` (video.probe; None: unknown), after checking the clip it
        describes. Frames much larger than the processor keeps are decoded at exactly the size it
        would resize them to (`size`): the grid it then makes is the one it makes of the full-size
        frames, the grid estimated here. Frames up to DECODE_MARGIN times that are decoded as
        stored and resized by the processor, as they always were. Without a frame size (LLaVA,
        whose every frame becomes one grid, or no header) they are decoded within the per-frame
        pixel budget (the bound for one frame without a frame count: never smaller)."""
        max_pixels = video.get("max_pixels")
        sampled = 0
        if info is not None:
            sampled = info.sampled_frames(video.get("frames"), video.get("fps"), video.get("max_frames", 768))
        if not sampled:
            return {**video, "max_pixels": self.adapter.decode_pixels(self.config, 1, max_pixels, saved=self.saved)}
        self.check(sampled, info.height, info.width, max_pixels=max_pixels, **limits)
        target = self.adapter.decode_size(self.config, sampled, info.height, info.width, max_pixels, saved=self.saved)
        if target is None:
            return {**video, "max_pixels": self.adapter.decode_pixels(self.config, sampled, max_pixels,
                                                                      saved=self.saved)}
        height, width = (int(v) for v in target)
        if info.width * info.height > DECODE_MARGIN * width * height:
            return {**video, "max_pixels": None, "size": (width, height)}
        return {**video, "max_pixels": None}

    def check_clip(self, clip, max_pixels: int | None, info=None, **limits) -> budget.Estimate:
        """The check again, exact: with the frames as decoded (frames decoded at the processor's size
        count as the full-size frames `info` describes, which the processor keeps them as)."""
        frames, height, width = clip.frames.shape[:3]
        if clip.sized and info is not None:
            height, width = info.height, info.width
        return self.check(frames, height, width, max_pixels=max_pixels, **limits)

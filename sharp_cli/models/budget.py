"""Visual-token budgets: how many tokens a clip becomes, known before a pixel is decoded.

Each family's reference pipeline bounds a video's pixels; the checkpoints' own processor files do
not (Qwen2.5-VL-7B's preprocessor_config.json allows 12,845,056 pixels a frame: 32 frames of
1080p would be ~43,000 tokens). sharp applies the reference budget itself and hands the video
processor explicit bounds, so that these functions say exactly what the processor will produce
(tests/test_models.py checks them against the processors):

- Qwen2-VL / Qwen2.5-VL (qwen-vl-utils): a frame gets at most 768 tokens' worth of pixels, and the
  clip 24,576 tokens' worth in all (per frame: max(min(768, 24576 x 2 / frames), 128 x 1.05) tokens'
  worth), at least 128 tokens' worth; 28-pixel tokens (14-pixel patches merged 2 x 2), two frames
  per token frame.
- Qwen3-VL (its video_preprocessor_config.json): the clip's pixels over all frames at most 24,576
  tokens' worth (25,165,824 at 32 pixels a token), at least 4 (4,096 pixels); a frame at most 768
  tokens' worth, at least 128 x 1.05 of a 128-token floor.
- LLaVA-OneVision / LLaVA-Video: every frame is resized to the vision tower's square input and
  pooled to a fixed grid (196 tokens at 384 px), plus one newline token; --max-pixels only bounds
  the decoded frames.

`--max-pixels` replaces the per-frame bound on the Qwen families (and bounds decoding everywhere).
A Qwen2/2.5-VL processor saved with a tighter upper bound than the budget keeps it (sharp-tiny's
12,544 pixels a frame): the estimate takes that bound as `saved`, read from the processor at hand
or, before the model loads, from the files in its folder (`saved_bound_in`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sharp_cli.errors import UsageError, VideoError

# Reference budgets, in tokens' worth of pixels (a token is factor x factor pixels).
QWEN2_FRAME_MIN, QWEN2_FRAME_MAX, QWEN2_CLIP_TOTAL = 128, 768, 24576
QWEN3_CLIP_MIN, QWEN3_CLIP_MAX, QWEN3_FRAME_MAX, QWEN3_FRAME_FLOOR = 4, 24576, 768, 128

# Text around the video, for the context estimate made before the tokenizer is at hand: the
# template and roles (a system prompt included), and the question at one token per two bytes of
# UTF-8 (English runs ~4 bytes a token, CJK 3), so the estimate errs on the long side.
TEMPLATE_TOKENS = 40


def resize_frame(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) a Qwen2-VL-style processor resizes one frame to: both multiples of
    `factor`, aspect ratio kept as far as rounding allows, pixels within [min_pixels, max_pixels]."""
    if max(height, width) > 200 * min(height, width):
        raise VideoError(f"a {width}x{height} frame is too narrow for the model (aspect ratio over 200)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_clip(frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                max_pixels: int) -> tuple[int, int]:
    """(height, width) Qwen3-VL's processor resizes a clip's frames to: the bounds hold for the
    pixels of all its frames together."""
    if height < factor or width < factor:  # tiny frames are first scaled up to one token
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) > 200 * min(height, width):
        raise VideoError(f"a {width}x{height} frame is too narrow for the model (aspect ratio over 200)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen2_bounds(frames: int, factor: int, temporal: int, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels of one frame."""
    token = factor * factor
    low = QWEN2_FRAME_MIN * token
    if max_pixels:
        return min(low, max_pixels), max_pixels
    padded = max(temporal, -(-frames // temporal) * temporal)  # the processor repeats the last frame
    high = max(min(QWEN2_FRAME_MAX * token, QWEN2_CLIP_TOTAL * token * temporal // padded), int(low * 1.05))
    return low, high


def qwen3_bounds(frames: int, factor: int, temporal: int, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels of the whole clip (t x h x w)."""
    token = factor * factor
    low = QWEN3_CLIP_MIN * token
    if max_pixels:
        budget = max_pixels * max(temporal, round(frames / temporal) * temporal)
        return min(low, budget), budget
    per_frame = max(min(QWEN3_FRAME_MAX * token, QWEN3_CLIP_MAX * token // frames),
                    int(QWEN3_FRAME_FLOOR * token * 1.05))
    return low, per_frame * frames


@dataclass
class Estimate:
    """What a clip will cost: its token grid, visual tokens, and the whole sequence (approximate)."""

    grid: tuple[int, int, int]  # token frames x rows x columns
    visual: int  # visual tokens of the grid (LLaVA's newline counted as text)
    text: int  # text tokens around the video (an upper-side estimate)
    new_tokens: int

    @property
    def sequence(self) -> int:
        return self.visual + self.text + self.new_tokens


def saved_bound(video_processor) -> int | None:
    """The upper bound (pixels) a loaded video processor was saved with, or None."""
    value = dict(getattr(video_processor, "size", None) or {}).get("longest_edge")
    return int(value) if value else None


# Where a checkpoint keeps its video processor's settings, first found wins (transformers' order:
# the processor file's nested entry, the video processor's own file, the image processor's file).
_PROCESSOR_FILES = (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                    ("preprocessor_config.json", None))


def saved_bound_in(folder: str | Path | None) -> int | None:
    """saved_bound, read from a model folder's files (cheap: before the model loads); None when the
    folder has none of them (random weights: the processor is built with the family's defaults)."""
    if not folder or not Path(folder).is_dir():
        return None
    for name, entry in _PROCESSOR_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        data = data.get(entry) if entry else data
        if not isinstance(data, dict):
            continue
        size = data.get("size") if isinstance(data.get("size"), dict) else {}
        value = size.get("longest_edge") or data.get("max_pixels")
        return int(value) if isinstance(value, (int, float)) and value > 0 else None
    return None


def context_length(config) -> int | None:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)


def estimate(adapter, config, frames: int, height: int, width: int, max_pixels: int | None = None,
             question: str = "", max_new_tokens: int = 0, saved: int | None = None) -> Estimate:
    grid = adapter.token_grid(config, frames, height, width, max_pixels, saved=saved)
    visual = grid[0] * grid[1] * grid[2]
    text = TEMPLATE_TOKENS + len(question.encode("utf-8")) // 2 + 1 + adapter.text_per_token_frame * grid[0]
    return Estimate(grid, visual, text + adapter.text_per_video, max_new_tokens)


def check(adapter, config, frames: int, height: int, width: int, *, max_pixels: int | None = None,
          question: str = "", max_new_tokens: int = 0, max_visual_tokens: int | None = None,
          saved: int | None = None) -> Estimate:
    """The estimate, or a one-line UsageError naming what to lower when the clip would exceed
    --max-visual-tokens or the model's context (max_position_embeddings). `saved`: the upper bound
    the model's video processor was saved with (saved_bound)."""
    est = estimate(adapter, config, frames, height, width, max_pixels, question, max_new_tokens, saved)
    lower = adapter.what_to_lower()
    layout = f"{frames} frames of {width}x{height} -> token grid {'x'.join(map(str, est.grid))}"
    if max_visual_tokens is not None and est.visual > max_visual_tokens:
        raise UsageError(f"{est.visual:,} visual tokens ({layout}) exceed --max-visual-tokens "
                         f"{max_visual_tokens:,}; lower {lower}")
    limit = context_length(config)
    if limit and est.sequence > limit:
        raise UsageError(f"the prompt would be about {est.sequence:,} tokens ({est.visual:,} visual, {layout}, "
                         f"+ ~{est.text:,} text + {max_new_tokens:,} new), over the model's {limit:,}-token "
                         f"context (max_position_embeddings); lower {lower}")
    return est

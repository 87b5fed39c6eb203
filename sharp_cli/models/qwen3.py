"""Qwen3-VL: one "<t seconds>" + <|vision_start|> pads <|vision_end|> block per frame pair,
(T/2)(H/32)(W/32) tokens, interleaved M-RoPE, and DeepStack.

The visual tokens are not one block: each token frame (two video frames) is a contiguous run of
pads, with its timestamp text and frame markers between runs. VisualLayout.segment_runs handles that.

DeepStack adds features from three vision-encoder layers to the hidden states at the visual
positions after decoder layers 0, 1 and 2. Pruning before layer 3 would drop tokens those
additions still target, so this family needs K >= 3 (min_layer); we enforce that rather than
prune the DeepStack masks too. For the same reason --method evs (pruning before layer 0) is refused
here with a usage error. Decoding calls the text model without the DeepStack kwargs, which
then does nothing.
"""

from __future__ import annotations

from sharp_cli.errors import ModelError, UsageError
from sharp_cli.models import budget
from sharp_cli.models.base import pooled_features
from sharp_cli.models.qwen import QwenVLAdapter

DEEPSTACK_LAYERS = 3


def _cat(parts):
    """5.23 splits features per video (a tuple); 5.17 returns one tensor."""
    import torch

    return torch.cat(list(parts), dim=0) if isinstance(parts, (tuple, list)) else parts


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3-vl"
    model_types = ("qwen3_vl",)
    hub_examples = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct")
    min_layer = DEEPSTACK_LAYERS
    min_layer_reason = ("Qwen3-VL's DeepStack adds visual features to the visual tokens after decoder "
                        "layers 0-2, so pruning must start at layer 3 or later")

    def check_evs(self) -> None:
        raise UsageError("--method evs is not supported on Qwen3-VL: DeepStack adds vision features to every "
                         "visual token after decoder layers 0-2, so tokens cannot be dropped before layer 0; "
                         "use sharp, fastv or random (K >= 3)")

    text_per_token_frame = 8  # "<t seconds>" (~6 tokens), <|vision_start|>, <|vision_end|>
    text_per_video = 0

    layout_keys = ()  # its processor writes each frame's timestamp into the prompt: frames always processed

    def processor_inputs(self, processor, prompt, clip, max_pixels, device=None):
        temporal = processor.video_processor.temporal_patch_size
        if len(clip.frames) < temporal:  # its processor refuses a clip shorter than one token frame
            import copy

            import numpy as np

            short, clip = clip, copy.copy(clip)
            repeat = [len(short.frames) - 1] * (temporal - len(short.frames))
            clip.frames = np.concatenate([short.frames, short.frames[repeat]])
            clip.indices = list(short.indices) + [short.indices[-1]] * len(repeat)
        return super().processor_inputs(processor, prompt, clip, max_pixels, device)

    def resized(self, frames, height, width, factor, temporal, max_pixels, saved=None):
        frames = max(frames, temporal)  # one frame is repeated to fill a token frame (above)
        low, high = self.pixel_bounds(frames, factor, temporal, max_pixels)
        return budget.resize_clip(frames, height, width, temporal, factor, low, high)

    def video_size(self, vp, frames, max_pixels):
        # The checkpoints' per-clip bound (25,165,824) is the reference total itself, which the
        # per-frame floor outweighs on long clips as the reference intends: the budget alone.
        low, high = self.pixel_bounds(frames, vp.patch_size * vp.merge_size, vp.temporal_patch_size, max_pixels)
        return {"shortest_edge": low, "longest_edge": high}

    def pixel_bounds(self, frames, factor, temporal, max_pixels):
        # Qwen3-VL's video processor bounds the pixels of the whole clip (t x h x w), not of a frame.
        return budget.qwen3_bounds(frames, factor, temporal, max_pixels)

    def bounds(self, frames, factor, temporal, max_pixels, saved=None):
        return self.pixel_bounds(frames, factor, temporal, max_pixels)  # its saved bound is per clip: video_size

    def decode_pixels(self, config, frames, max_pixels=None, saved=None):
        vc = config.vision_config
        factor = vc.patch_size * vc.spatial_merge_size
        return max_pixels or self.pixel_bounds(frames, factor, vc.temporal_patch_size, None)[1] // max(1, frames)

    def vision(self, model, inputs):
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        deepstack = [_cat(level) for level in out.deepstack_features]
        if len(deepstack) > self.min_layer:
            raise ModelError(f"this checkpoint adds DeepStack features after {len(deepstack)} decoder layers; "
                             f"sharp supports at most {self.min_layer}")
        return {"video": pooled_features(out), "deepstack": deepstack}

    def video_features(self, features: dict, is_video):
        return features["video"], {"visual_pos_masks": is_video, "deepstack_visual_embeds": features["deepstack"]}

    def build_processor(self, tokenizer, config):
        from transformers import AutoProcessor  # noqa: F401  (registers processor classes)
        from transformers.models.qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl import Qwen3VLProcessor, Qwen3VLVideoProcessor

        vc = config.vision_config
        common = dict(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                      merge_size=vc.spatial_merge_size)
        token = (vc.patch_size * vc.spatial_merge_size) ** 2  # pixels per merged token
        # The checkpoints' own bounds, in tokens: videos 4..24576 per clip, images 64..16384.
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                **common, size={"shortest_edge": 64 * token, "longest_edge": 16384 * token}),
            video_processor=Qwen3VLVideoProcessor(
                **common, size={"shortest_edge": 4 * token, "longest_edge": 24576 * token}),
            tokenizer=tokenizer,
            chat_template=self.synthetic_chat_template(),
        )

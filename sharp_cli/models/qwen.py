"""Qwen2-VL and Qwen2.5-VL: one contiguous <|video_pad|> block, (T/2)(H/28)(W/28) tokens, 3-D M-RoPE."""

from __future__ import annotations

import inspect

from sharp_cli.models import budget
from sharp_cli.models.base import Adapter, Encoded, VisualLayout, pooled_features, question_range, text_config_attr

# Our own minimal template for synthetic processors (real checkpoints ship theirs).
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _call_with_supported(fn, **kwargs):
    """Pass only the keyword arguments `fn` accepts (signatures moved between 5.x releases)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**{k: v for k, v in kwargs.items() if v is not None})
    return fn(**{k: v for k, v in kwargs.items() if k in params and v is not None})


class QwenVLAdapter(Adapter):
    family = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    hub_examples = ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")

    def skip_modules(self) -> list[str]:
        # bitsandbytes matches from the start of the full module name; the list replaces the
        # default, so lm_head must be named or 4-bit loading breaks.
        return ["model.visual", "lm_head"]

    text_per_video = 2  # <|vision_start|>, <|vision_end|>

    def processor_inputs(self, processor, prompt, clip, max_pixels, device=None):
        vp = processor.video_processor
        size = self.video_size(vp, len(clip.frames), max_pixels)
        if getattr(clip, "sized", False):  # decoded at the size this processor makes of the full-size frames
            height, width = clip.frames.shape[1:3]  # multiples of its token size: bounds around them keep them
            size = {"shortest_edge": min(size["shortest_edge"], height * width),
                    "longest_edge": max(size["longest_edge"],
                                        (len(clip.frames) + vp.temporal_patch_size) * height * width)}
        video_kwargs = {"do_sample_frames": False, "video_metadata": [clip.metadata()], "size": size,
                        **({"device": str(device)} if device is not None else {})}
        if hasattr(type(vp), "cap_pixels_per_frame"):  # the budget is in the bounds already
            video_kwargs["cap_pixels_per_frame"] = False
        out = processor(text=[prompt], videos=[clip.frames], return_tensors="pt", **video_kwargs)
        return self.mark_question(processor, prompt, out)

    layout_keys = ("video_grid_thw", "second_per_grid_ts")

    def layout_inputs(self, processor, prompt, layout):
        """The processor's own expansion (one video token per merged patch), done on the text, then
        its tokenizer and token types: what the full call returns, less the pixels (tests compare)."""
        from transformers import BatchFeature

        merge = processor.video_processor.merge_size ** 2
        count = int(layout["video_grid_thw"][0].prod()) // merge
        if str(prompt).count(processor.video_token) != 1:
            return None
        text = str(prompt).replace(processor.video_token, processor.video_token * count)
        data = dict(processor.tokenizer([text]))
        if layout["token_types"]:  # as the full call did (transformers versions differ)
            data["mm_token_type_ids"] = processor.create_mm_token_type_ids(data["input_ids"])
        out = BatchFeature(data=data, tensor_type="pt")
        for key in self.layout_keys:
            out[key] = layout[key]
        return self.mark_question(processor, prompt, out)

    def video_size(self, vp, frames: int, max_pixels: int | None) -> dict:
        """The size bounds handed to video processor `vp`: the family's budget, or --max-pixels; a
        processor saved with a tighter upper bound than the budget keeps it (sharp-tiny's frames
        stay at the size it was trained at; the checkpoints' own files are all looser)."""
        low, high = self.bounds(frames, vp.patch_size * vp.merge_size, vp.temporal_patch_size, max_pixels,
                                budget.saved_bound(vp))
        return {"shortest_edge": low, "longest_edge": high}

    def pixel_bounds(self, frames: int, factor: int, temporal: int, max_pixels: int | None) -> tuple[int, int]:
        """(shortest_edge, longest_edge) of the video processor: pixels of one frame on Qwen2/2.5-VL."""
        return budget.qwen2_bounds(frames, factor, temporal, max_pixels)

    def bounds(self, frames, factor, temporal, max_pixels, saved=None) -> tuple[int, int]:
        """pixel_bounds, tightened to the bound the processor was saved with (without --max-pixels)."""
        low, high = self.pixel_bounds(frames, factor, temporal, max_pixels)
        if saved and not max_pixels and saved < high:
            low, high = min(low, saved), saved
        return low, high

    def resized(self, frames, height, width, factor, temporal, max_pixels, saved=None) -> tuple[int, int]:
        low, high = self.bounds(frames, factor, temporal, max_pixels, saved)
        return budget.resize_frame(height, width, factor, low, high)

    def token_grid(self, config, frames, height, width, max_pixels=None, saved=None):
        vc = config.vision_config
        factor, temporal = vc.patch_size * vc.spatial_merge_size, vc.temporal_patch_size
        h, w = self.resized(frames, height, width, factor, temporal, max_pixels, saved)
        return -(-frames // temporal), h // factor, w // factor

    def decode_pixels(self, config, frames, max_pixels=None, saved=None):
        vc = config.vision_config
        return max_pixels or self.bounds(frames, vc.patch_size * vc.spatial_merge_size,
                                         vc.temporal_patch_size, None, saved)[1]

    def decode_size(self, config, frames, height, width, max_pixels=None, saved=None):
        vc = config.vision_config
        return self.resized(frames, height, width, vc.patch_size * vc.spatial_merge_size, vc.temporal_patch_size,
                            max_pixels, saved)

    def encode(self, model, inputs, features=None) -> Encoded:
        inner = model.model
        input_ids = inputs["input_ids"]
        grid_thw = inputs["video_grid_thw"]
        is_video = input_ids == model.config.video_token_id
        video, extra = self.video_features(features if features is not None else self.vision(model, inputs), is_video)
        embeds = self.embed(model, input_ids)
        if int(is_video.sum()) != video.shape[0]:
            raise ValueError(f"{int(is_video.sum())} video tokens but {video.shape[0]} video features")
        embeds = embeds.masked_scatter(is_video.unsqueeze(-1), video.to(embeds.dtype))
        position_ids, _ = _call_with_supported(
            inner.get_rope_index,
            input_ids=input_ids,
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            video_grid_thw=grid_thw,
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=inputs.get("attention_mask"),
        )
        merge = model.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in grid_thw[0])
        layout = VisualLayout(
            indices=is_video[0].nonzero().squeeze(-1),
            grid=(t, h // merge, w // merge),
            frames_per_step=int(model.config.vision_config.temporal_patch_size),
            seq_len=input_ids.shape[1],
            question=question_range(inputs, input_ids.shape[1]),
        )
        next_position = position_ids.amax(dim=-1, keepdim=True) + 1  # (3, 1, 1)
        return Encoded(embeds, position_ids, layout, next_position, extra)

    def vision(self, model, inputs):
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        return {"video": pooled_features(features)}

    def video_features(self, features: dict, is_video):
        """(features of the video tokens in sequence order, extra kwargs for the text model)."""
        return features["video"], {}

    def special_tokens(self, config) -> dict[str, int]:
        return {
            "<|endoftext|>": text_config_attr(config, "bos_token_id") or text_config_attr(config, "eos_token_id") - 2,
            "<|im_start|>": text_config_attr(config, "eos_token_id") - 1,
            "<|im_end|>": text_config_attr(config, "eos_token_id"),
            "<|vision_start|>": config.vision_start_token_id,
            "<|vision_end|>": config.vision_end_token_id,
            "<|vision_pad|>": getattr(config, "vision_token_id", None) or config.vision_start_token_id + 2,
            "<|image_pad|>": config.image_token_id,
            "<|video_pad|>": config.video_token_id,
        }

    def synthetic_chat_template(self) -> str:
        return _QWEN_TEMPLATE

    def build_processor(self, tokenizer, config):
        from transformers import AutoProcessor  # noqa: F401  (registers processor classes)
        from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        vc = config.vision_config
        common = dict(
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
        )
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            video_processor=Qwen2VLVideoProcessor(**common),
            tokenizer=tokenizer,
            chat_template=self.synthetic_chat_template(),
        )


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2-vl"
    model_types = ("qwen2_vl",)
    hub_examples = ("Qwen/Qwen2-VL-7B-Instruct",)
    layout_keys = ("video_grid_thw",)  # no second_per_grid_ts: Qwen2-VL's positions ignore time

    def build_processor(self, tokenizer, config):
        from transformers.models.qwen2_vl import (
            Qwen2VLImageProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        vc = config.vision_config
        common = dict(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                      merge_size=vc.spatial_merge_size)
        return Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**common),
            video_processor=Qwen2VLVideoProcessor(**common),
            tokenizer=tokenizer,
            chat_template=self.synthetic_chat_template(),
        )

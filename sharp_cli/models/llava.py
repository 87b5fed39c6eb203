"""LLaVA-OneVision and LLaVA-Video (LlavaOnevisionForConditionalGeneration): SigLIP + projector,
every frame pooled to a fixed grid (27x27 -> 14x14 = 196 tokens at 384 px), one <video> block.

The block holds frames x 196 pooled tokens, frame-major, then one image_newline token that closes
the video. The newline is not a visual token of the grid: sharp treats it as text and never prunes
it. The text model is plain Qwen2 with 1-D RoPE, so positions are 0..L-1 and decoding goes on from L.
"""

from __future__ import annotations

from sharp_cli.models.base import Adapter, Encoded, VisualLayout, pooled_features, question_range, text_config_attr

# Our own minimal template for synthetic processors (real checkpoints ship theirs).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pooled_side(vision_config) -> int:
    """Side of a frame's pooled token grid: the patch grid halved, rounded up (27 -> 14)."""
    patches = vision_config.image_size // vision_config.patch_size
    return -(-patches // 2)


class LlavaOnevisionAdapter(Adapter):
    family = "llava-onevision"
    model_types = ("llava_onevision",)
    hub_examples = ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/LLaVA-Video-7B-Qwen2-hf",
                    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")

    def skip_modules(self) -> list[str]:
        return ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

    def processor_inputs(self, processor, prompt, clip, max_pixels, device=None):
        # Every frame is resized to the vision tower's input size, so the token count per frame is
        # fixed; max_pixels only bounded the frames while decoding.
        out = processor(text=[prompt], videos=[clip.frames], return_tensors="pt", do_sample_frames=False,
                        video_metadata=[clip.metadata()], **({"device": str(device)} if device is not None else {}))
        return self.mark_question(processor, prompt, out)

    text_per_video = 2  # the newline embedding after the frames, and the template's "\n"
    decode_sides = 2  # frames are decoded at most twice the tower's input side (then resized to it)

    def token_grid(self, config, frames, height, width, max_pixels=None, saved=None):
        side = pooled_side(config.vision_config)
        return frames, side, side

    def decode_pixels(self, config, frames, max_pixels=None, saved=None):
        return max_pixels or (self.decode_sides * config.vision_config.image_size) ** 2

    def what_to_lower(self) -> str:
        return "--frames (or --fps / --max-frames); every frame is a fixed grid here, --max-pixels does not change it"

    def vision(self, model, inputs):
        import torch

        inner, config = model.model, model.config
        pixels = inputs["pixel_values_videos"]
        out = inner.get_video_features(  # vision tower + projector + pooling
            pixels.to(inner.vision_tower.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        video = pooled_features(out).flatten(0, -2)  # (frames * side * side [+ 1], D)
        side = pooled_side(config.vision_config)
        if video.shape[0] == pixels.shape[1] * side * side:  # transformers < 5.23 appends the newline in forward()
            video = torch.cat([video, inner.image_newline.view(1, -1).to(video)])
        return {"video": video}

    def encode(self, model, inputs, features=None) -> Encoded:
        import torch

        config = model.config
        input_ids = inputs["input_ids"]
        frames = inputs["pixel_values_videos"].shape[1]
        video = (features if features is not None else self.vision(model, inputs))["video"]
        side = pooled_side(config.vision_config)
        grid_tokens = frames * side * side
        is_video = input_ids == config.video_token_id
        if int(is_video.sum()) != video.shape[0] or video.shape[0] != grid_tokens + 1:
            raise ValueError(f"{int(is_video.sum())} video tokens but {video.shape[0]} video features "
                             f"({frames} frames of {side}x{side} + 1 newline expected)")
        embeds = self.embed(model, input_ids)
        embeds = embeds.masked_scatter(is_video.unsqueeze(-1), video.to(embeds.dtype))
        length = input_ids.shape[1]
        block = is_video[0].nonzero().squeeze(-1)
        layout = VisualLayout(indices=block[:-1], grid=(frames, side, side), frames_per_step=1, seq_len=length,
                              question=question_range(inputs, length))
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)  # (1, L)
        return Encoded(embeds, position_ids, layout, position_ids[:, -1:] + 1, {})

    def special_tokens(self, config) -> dict[str, int]:
        # Configs that leave eos out: <image> and <video> were added right after Qwen2's <|im_end|>.
        eos = text_config_attr(config, "eos_token_id") or config.image_token_id - 1
        return {
            "<|endoftext|>": text_config_attr(config, "bos_token_id") or eos - 2,
            "<|im_start|>": eos - 1,
            "<|im_end|>": eos,
            "<image>": config.image_token_id,
            "<video>": config.video_token_id,
        }

    def synthetic_chat_template(self) -> str:
        return _LLAVA_TEMPLATE

    def build_processor(self, tokenizer, config):
        from transformers import AutoProcessor  # noqa: F401  (registers processor classes)
        from transformers.models.llava_onevision import (
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
        )

        vc = config.vision_config
        size = {"height": vc.image_size, "width": vc.image_size}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=config.image_grid_pinpoints),
            video_processor=LlavaOnevisionVideoProcessor(size=size),
            tokenizer=tokenizer,
            num_image_tokens=(vc.image_size // vc.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            chat_template=self.synthetic_chat_template(),
        )

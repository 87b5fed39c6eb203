"""What the engine needs to know about a model family, in one small object per family.

An adapter answers: which modules stay out of quantization, where the decoder layers are, how a
question and a video become model inputs, where the visual tokens sit in the sequence and which
(frame, row, column) each one came from, and which positions the next decoded token takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class VisualLayout:
    """Where the prunable visual tokens are.

    `indices[n]` is the sequence position of visual token n; tokens are ordered frame-major, then
    row, then column, over a regular (T, H, W) token grid. `frames_per_step` is how many sampled
    video frames one token frame covers (Qwen merges 2; LLaVA 1).
    """

    indices: Any  # LongTensor (N,)
    grid: tuple[int, int, int]
    frames_per_step: int
    seq_len: int
    text_positions: Any = None  # LongTensor of every other position; computed once at encode time
    question: tuple[int, int] | None = None  # [start, end) of the question's own tokens, when known

    def __post_init__(self):
        import torch

        if self.text_positions is None:  # one host sync here spares one inside prefill
            is_text = torch.ones(self.seq_len, dtype=torch.bool, device=self.indices.device)
            is_text[self.indices] = False
            self.text_positions = is_text.nonzero().squeeze(-1)
        self.visual_end = int(self.indices[-1]) + 1 if self.indices.numel() else 0

    @property
    def num_visual(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def token_frame(self):
        """Token-frame index t of every visual token, shape (N,)."""
        import torch

        t, h, w = self.grid
        return torch.arange(t, device=self.indices.device).repeat_interleave(h * w)

    def segment_runs(self, segment_frames: int) -> list[tuple[int, int]]:
        """Sequence ranges [start, end) of the visual segments: `segment_frames` video frames each,
        rounded up to whole token frames. Each token frame must be one contiguous block of the
        sequence; a segment's run spans from its first visual token to its last, so text that sits
        between the token frames of one segment (Qwen3-VL's timestamps and frame markers) lies
        inside the run and shares the segment's attention block."""
        t, h, w = self.grid
        steps = max(1, -(-segment_frames // self.frames_per_step))
        idx = self.indices.tolist()
        per = h * w
        for f in range(t):
            if idx[(f + 1) * per - 1] - idx[f * per] != per - 1:
                raise ValueError(f"visual tokens of token frame {f} are not contiguous in the sequence")
        return [(idx[first * per], idx[min(t, first + steps) * per - 1] + 1) for first in range(0, t, steps)]

    def describe(self) -> str:
        t, h, w = self.grid
        return f"{t}x{h}x{w}"


class Prompt(str):
    """The chat-templated prompt, still knowing which question it was made from (so that the
    question's own tokens can be found after the processor expands the video)."""

    question: str = ""


def question_range(inputs, seq_len: int) -> tuple[int, int] | None:
    """[start, end) of the question's tokens in the expanded sequence, from the marks
    Adapter.mark_question left on the processor's output."""
    marks = getattr(inputs, "sharp_question", None)
    if not marks or marks[1] < 1:
        return None
    after, count = marks
    return seq_len - after - count, seq_len - after


def pooled_features(output):
    """The visual features of get_video_features as one tensor. In transformers 5.x it returns a
    ModelOutput whose pooler_output is a per-video tuple (Qwen: (tokens, D) each), concatenated
    here along dim 0; a bare tensor passes through."""
    import torch

    pooled = getattr(output, "pooler_output", output)
    if isinstance(pooled, (tuple, list)):
        pooled = torch.cat(list(pooled), dim=0)
    return pooled


def text_config_attr(config, name: str):
    """A token id (or other field) of the text model: the top-level config's, else its
    text_config's; the first one where the config holds a list (several eos ids)."""
    value = getattr(config, name, None)
    if value is None and hasattr(config, "text_config"):
        value = getattr(config.text_config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0]
    return value


@dataclass
class Encoded:
    """Everything prefill needs, produced by the adapter (vision encoder already run)."""

    inputs_embeds: Any  # (1, L, D)
    position_ids: Any  # family-specific, passed to the text model as is
    layout: VisualLayout
    next_position: Any  # position id tensor for the first decoded token (same rank as position_ids)
    extra: dict  # family-specific kwargs for the text model that only concern visual positions (DeepStack)
    features: Any = None  # the adapter's vision() output this was built from (engine.encode sets it)


class Adapter:
    """Base class: one subclass per model family."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    hub_examples: tuple[str, ...] = ()
    min_layer: int = 1  # smallest pruning layer K the family supports
    min_layer_reason: str = ""  # why, when min_layer > 1 (shown in the usage error)

    def skip_modules(self) -> list[str]:
        raise NotImplementedError

    def text_model(self, model):
        return model.model.language_model

    def decoder_layers(self, model):
        return self.text_model(model).layers

    def lm_head(self, model):
        return model.lm_head

    def embed(self, model, input_ids):
        return model.get_input_embeddings()(input_ids)

    def rope(self, layer):
        """The family's own apply_rotary_pos_emb(q, k, cos, sin), taken from its modeling module so
        that scoring applies exactly the rotation the attention layer applies."""
        import sys

        return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb

    def chat_messages(self, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]

    def prompt(self, processor, question: str) -> Prompt:
        text = Prompt(processor.apply_chat_template(self.chat_messages(question), add_generation_prompt=True,
                                                    tokenize=False))
        text.question = question
        return text

    def mark_question(self, processor, prompt, inputs):
        """Leave on `inputs` (as attribute sharp_question) how many tokens follow the question and
        how many it has: "the question's tokens" are those that differ between this prompt and the
        same template with an empty question, so template tokens on either side (<|vision_end|>,
        LLaVA's newline, <|im_end|> and the assistant header) never count. The video sits before
        the question, so counting from the end holds after the processor expands it."""
        question = getattr(prompt, "question", None)
        if not question:
            return inputs
        tok = getattr(processor, "tokenizer", processor)
        full = tok(str(prompt), add_special_tokens=False)["input_ids"]
        bare = tok(str(self.prompt(processor, "")), add_special_tokens=False)["input_ids"]
        shortest = min(len(full), len(bare))
        head = next((i for i in range(shortest) if full[i] != bare[i]), shortest)
        tail = next((i for i in range(shortest - head) if full[-1 - i] != bare[-1 - i]), shortest - head)
        inputs.sharp_question = (tail, len(full) - head - tail)
        return inputs

    def processor_inputs(self, processor, prompt: str, clip, max_pixels: int | None, device=None) -> dict:
        """The processor's full call on `prompt` and the clip's frames. device: where its video
        processor resizes and normalises them (transformers' `device` video kwarg; None: the CPU),
        so the pixel values come back there."""
        raise NotImplementedError

    # What a question about a video whose vision output is cached needs of the processor's video
    # work: only the layout (grid, timing), not the pixels. Families that can rebuild the prompt
    # from it list those outputs here and implement layout_inputs; the others process the frames.
    layout_keys: tuple[str, ...] = ()

    def layout_inputs(self, processor, prompt: str, layout: dict):
        """The processor's inputs for `prompt` without pixels, from `layout` (the layout_keys of an
        earlier full call for the same video); None where this family cannot."""
        return None

    # Token budget (models/budget.py): what a clip costs, from its frame count and size alone.
    text_per_token_frame: int = 0  # text tokens the processor adds per token frame (Qwen3-VL's timestamps)
    text_per_video: int = 0  # text tokens around the video block (markers, LLaVA's newline)

    def token_grid(self, config, frames: int, height: int, width: int, max_pixels: int | None = None,
                   saved: int | None = None):
        """(token frames, rows, columns) the processor makes of `frames` frames of height x width;
        `saved`: the upper bound its video processor was saved with (budget.saved_bound)."""
        raise NotImplementedError

    def visual_tokens(self, config, frames: int, height: int, width: int, max_pixels: int | None = None,
                      saved: int | None = None) -> int:
        t, h, w = self.token_grid(config, frames, height, width, max_pixels, saved=saved)
        return t * h * w

    def decode_pixels(self, config, frames: int, max_pixels: int | None = None, saved: int | None = None) -> int | None:
        """Pixels a frame is decoded to at most: no more than the processor keeps (None: as stored)."""
        return max_pixels

    def decode_size(self, config, frames: int, height: int, width: int, max_pixels: int | None = None,
                    saved: int | None = None) -> tuple[int, int] | None:
        """(height, width) the processor resizes such frames to, when it depends on their size
        (the Qwen families); None where every frame becomes the same grid (LLaVA)."""
        return None

    def what_to_lower(self) -> str:
        return "--frames (or --fps / --max-frames) or --max-pixels"

    def vision(self, model, inputs):
        """The vision encoder's output for the video tokens: the expensive, question-independent part
        of encode(), which a per-video cache keeps (sharp_cli/video_cache.py). Tensors only."""
        raise NotImplementedError

    def encode(self, model, inputs, features=None) -> Encoded:
        """Build prefill inputs; runs vision() unless its output for this video is given. Timed by
        the engine."""
        raise NotImplementedError

    def validate_prune(self, cfg, num_layers: int | None = None):
        """cfg resolved for this family and a model of num_layers decoder layers
        (PruneConfig.resolved_for, with the family's smallest K and the reason for it); UsageError
        where the family cannot prune before layer 0 and cfg asks for evs."""
        if cfg.method == "evs":
            self.check_evs()
        return cfg.resolved_for(num_layers, self.min_layer, self.min_layer_reason)

    def check_evs(self) -> None:
        """Raise UsageError where pruning before decoder layer 0 (--method evs) is not supported."""

    def decode_position(self, encoded: Encoded, step: int):
        """Position ids of the step-th decoded token (0 = the token sampled after prefill)."""
        return encoded.next_position + step

    # For synthetic processors (tests and --random-weights): the family's special tokens and template.
    def special_tokens(self, config) -> dict[str, int]:
        raise NotImplementedError

    def synthetic_chat_template(self) -> str:
        raise NotImplementedError

    def build_processor(self, tokenizer, config):
        raise NotImplementedError

"""Per-question options over a command's defaults: the extra body fields of `sharp serve` requests
and the per-line fields of `sharp batch` items, validated the same way for both.

The command line sets the defaults (everything `sharp ask` takes); a request or item may change the
method, ratio, layer, frame sampling, answer length and sampling, nothing that needs a reload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from sharp_cli.errors import UsageError, one_line
from sharp_cli.sampling import Sampling

MAX_TOKENS_LIMIT = 8192  # a random-weights model may never say EOS; this bounds what one request can cost
# The largest max_pixels a request or item may ask for: a 4096x4096 frame (16,384 tokens of Qwen3-VL's
# 32 pixels, more than any checkpoint's processor keeps of a frame). Beyond the model's context the
# clip is refused anyway (clip_budget.py), but only after its header is read.
MAX_PIXELS_LIMIT = 4096 * 4096


class OptionFields(BaseModel):
    """The per-question options. Unknown fields are refused, so a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid")

    method: Optional[str] = None
    ratio: Optional[float] = None
    layer: Optional[int] = None
    frames: Optional[int] = None
    fps: Optional[float] = None
    max_pixels: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value, info):
        """JSON's true/false and strings are not numbers here (pydantic would read true as 1 and "0.5"
        as 0.5): a 400, an error line, as a typed API answers a mistyped field."""
        if isinstance(value, (bool, str)) and _is_number(cls.model_fields[info.field_name].annotation):
            said = ("true" if value else "false") if isinstance(value, bool) else "a string"
            raise PydanticCustomError("number_type", "expected a number, got {value}", {"value": said})
        return value


_NUMBERS = ({int}, {float}, {int, type(None)}, {float, type(None)})


def _is_number(annotation) -> bool:
    """int, float, or Optional of one."""
    return set(getattr(annotation, "__args__", (annotation,))) in _NUMBERS


class BatchItem(OptionFields):
    """One line of `sharp batch` input: the item fields, the per-question options, and `options`, the
    multiple-choice answers (asked as `sharp eval` asks them; batch_items.prompt_of)."""

    video: str
    question: str
    id: Optional[Union[int, str]] = None
    options: Optional[list[str]] = None

    @field_validator("options", mode="before")
    @classmethod
    def _choices(cls, value):
        """2 to 26 texts (numbers are read as text, as `sharp eval` reads them; "A. red" loses its
        prefix); an empty list or null: an open question, as in `sharp eval`."""
        from sharp_cli.letters import LETTERS, strip_letter_prefixes

        if value is None:
            return None
        if not isinstance(value, list) or any(isinstance(o, bool) or not isinstance(o, (str, int, float))
                                              for o in value):
            raise PydanticCustomError("options_type", "expected a list of 2 to {most} answer texts",
                                      {"most": len(LETTERS)})
        if value and not 2 <= len(value) <= len(LETTERS):
            raise PydanticCustomError("options_count", "expected a list of 2 to {most} answer texts, got {count}",
                                      {"most": len(LETTERS), "count": len(value)})
        return strip_letter_prefixes(value) or None


@dataclass(frozen=True)
class Defaults:
    cfg: object  # PruneConfig from the command line, validated
    video: dict  # load_video keyword arguments: frames, fps, max_frames, max_pixels, backend
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Plan:
    """Everything one question needs besides the model, the video and the question itself."""

    cfg: object  # PruneConfig, resolved for the model when one was given (loaded.resolve_prune)
    video: dict
    max_new_tokens: int
    sampling: Sampling


def resolve(options: OptionFields, defaults: Defaults, loaded=None) -> Plan:
    """The defaults with the given fields applied; UsageError (one line) for a bad value. With the
    loaded model, the question's config is resolved for it here (K chosen, --layer checked against
    its depth), once: the defaults' own config when no field changes it, already resolved by the
    command."""
    changes = {name: getattr(options, name) for name in ("method", "ratio", "layer")
               if getattr(options, name) is not None}
    cfg = replace(defaults.cfg, **changes).validate() if changes else defaults.cfg.validate()
    if loaded is not None and not cfg.resolved:
        cfg = loaded.resolve_prune(cfg)

    video = dict(defaults.video)
    if options.frames is not None:
        video["frames"] = options.frames
        video["fps"] = None  # asking for a frame count means: not the server's default fps
    if options.fps is not None:
        video["fps"] = options.fps
    if options.max_pixels is not None:
        video["max_pixels"] = options.max_pixels
    if video.get("frames") is not None and video["frames"] < 1:
        raise UsageError(f"frames must be >= 1, got {video['frames']}")
    if video.get("fps") is not None and not video["fps"] > 0:
        raise UsageError(f"fps must be > 0, got {video['fps']}")
    if options.max_pixels is not None and not 1 <= options.max_pixels <= MAX_PIXELS_LIMIT:
        raise UsageError(f"max_pixels must be in [1, {MAX_PIXELS_LIMIT:,}] (a 4096x4096 frame), "
                         f"got {options.max_pixels:,}")
    if video.get("max_pixels") is not None and video["max_pixels"] < 1:
        raise UsageError(f"max_pixels must be >= 1, got {video['max_pixels']}")

    max_new_tokens = defaults.max_new_tokens if options.max_tokens is None else options.max_tokens
    if not 1 <= max_new_tokens <= MAX_TOKENS_LIMIT:
        raise UsageError(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_new_tokens}")

    picked = {name: getattr(options, name) for name in ("temperature", "top_p", "top_k", "seed")
              if getattr(options, name) is not None}
    sampling = replace(defaults.sampling, **picked).validate()
    return Plan(cfg, video, max_new_tokens, sampling)


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's report as one line: where, what, and how many more problems there are."""
    problems = exc.errors(include_url=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    text = f"{prefix}{where}: {message}" if where else f"{prefix}{message}"
    if len(problems) > 1:
        text += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return one_line(text, 300)


def as_field_names(message: str) -> str:
    """A UsageError message with its command-line flags as the fields a request or item sends
    (`--max-pixels` -> `max_pixels`): the checks are shared, the reader is not at a shell."""
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)

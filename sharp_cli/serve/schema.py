"""OpenAI's chat-completions shapes as sharp serves them: the request (with sharp's extra fields),
the question and video it carries, the `chat.completion` answer, the streamed `chat.completion.chunk`
events, and the `{"error": {...}}` body every failure gets.

One request is one question about one video: a single user message whose content holds one
`video_url` part (a file:// URL, a path or a data: URL) and text parts (the question).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from sharp_cli import jsonl
from sharp_cli.overrides import OptionFields, validation_message


class ApiError(Exception):
    """A failure sent back as OpenAI's error body with this HTTP status."""

    def __init__(self, status: int, message: str, code: str, type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param

    def body(self) -> dict:
        return error_body(self.message, self.code, self.type, self.param)


def error_body(message: str, code: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add name, tool_calls: None, ...

    role: str
    content: Union[str, list[Any], None] = None  # parts are checked by hand: clearer messages


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


# Standard fields that change nothing here at their neutral value (and are refused otherwise).
_NEUTRAL = {"n": (None, 1), "stop": (None, [], ""), "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False), "top_logprobs": (None, 0),
            "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
            "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
            "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}
# Standard fields that are accepted and ignored (bookkeeping for the caller's side).
_IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "verbosity")


class ChatRequest(OptionFields):
    model: Optional[str] = None
    messages: list[Message]
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


def _neutral(value, neutral: tuple) -> bool:
    """One of the neutral values, true/false only where they are (`"n": true` is not `"n": 1`)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def _standard_field_names() -> tuple[str, ...]:
    return tuple(_NEUTRAL) + _IGNORED


def parse_request(raw: bytes) -> ChatRequest:
    """Bytes of a POST body -> a validated ChatRequest, or ApiError 400 saying what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:  # json's own limit on nesting: a client's doing, not a server failure
        raise ApiError(400, "the request body is nested too deeply", "invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    for name in _standard_field_names():
        if name not in data:
            continue
        value = data.pop(name)
        if name in _NEUTRAL and not _neutral(value, _NEUTRAL[name]):
            raise ApiError(400, f"'{name}' is not supported by sharp serve", "unsupported_parameter", param=name)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc), "invalid_value") from None
    if request.max_completion_tokens is not None:
        if request.max_tokens is not None and request.max_tokens != request.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", "invalid_value")
        request.max_tokens = request.max_completion_tokens
    return request


def question_and_video(request: ChatRequest) -> tuple[str, str]:
    """(question, video URL) from the messages; ApiError 400 unless it is one question about one video."""
    if len(request.messages) != 1 or request.messages[0].role != "user":
        roles = ", ".join(m.role for m in request.messages) or "none"
        raise ApiError(400, "send exactly one user message (a video_url part and the question); system "
                       f"prompts and earlier turns are not supported (got: {roles})", "invalid_messages",
                       param="messages")
    content = request.messages[0].content
    texts, videos = ([content], []) if isinstance(content, str) else _parts(content or [])
    if not videos:
        raise ApiError(400, 'the message has no video: add a content part {"type": "video_url", '
                       '"video_url": {"url": "file:///path/to/video.mp4"}}', "no_video", param="messages")
    if len(videos) > 1:
        raise ApiError(400, f"one video per request, got {len(videos)}", "too_many_videos", param="messages")
    question = "\n".join(texts).strip()
    if not question:
        raise ApiError(400, "the question is empty: add a text part", "empty_question", param="messages")
    return question, videos[0]


def _parts(parts: list) -> tuple[list[str], list[str]]:
    texts, videos = [], []
    for i, part in enumerate(parts):
        where = f"messages[0].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url" and isinstance(part.get("video_url"), dict) \
                and isinstance(part["video_url"].get("url"), str):
            videos.append(part["video_url"]["url"])
        elif kind in ("text", "video_url"):
            shape = '{"type": "text", "text": "..."}' if kind == "text" else \
                '{"type": "video_url", "video_url": {"url": "..."}}'
            raise ApiError(400, f"{where} must look like {shape}", "invalid_value", param="messages")
        else:
            raise ApiError(400, f"{where}: content parts of type {kind!r} are not supported; send one "
                           "'video_url' part and 'text' parts", "unsupported_content", param="messages")
    return texts, videos


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(record: dict) -> dict:
    prompt, completion = int(record["sequence_tokens"]), int(record["new_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(request_id: str, model: str, created: int, record: dict, finish_reason: str) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": record["answer"]},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(record),
        "sharp": record,
    }


def chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          **extra: Any) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def usage_chunk(request_id: str, model: str, created: int, record: dict) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage(record)}


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, default=jsonl.plain, separators=(",", ":"))
    return f"data: {text}\n\n"


def plain(record: dict) -> dict:
    """The record as plain JSON values (numpy or torch scalars become numbers), for JSONResponse."""
    return json.loads(json.dumps(record, default=jsonl.plain))


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "sharp"}


def now() -> int:
    return int(time.time())

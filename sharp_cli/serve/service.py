"""What `sharp serve` holds and does besides HTTP: the loaded model, its worker thread and prior
store, the media policy, and the steps of one request (check, decode the video, answer)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sharp_cli.errors import (SharpError, UsageError, VideoError, describe, is_out_of_memory, one_line,
                              release_gpu_memory)
from sharp_cli.overrides import Defaults, Plan, as_field_names, resolve
from sharp_cli.serve.media import MediaPolicy, VideoSource
from sharp_cli.serve.schema import ApiError, ChatRequest, now, question_and_video
from sharp_cli.serve.worker import Worker
from sharp_cli.video_cache import VideoCache

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines look like its own


@dataclass
class Settings:
    model_ids: tuple[str, ...]  # the first is what /v1/models lists; any of them is accepted in "model"
    defaults: Defaults
    media: MediaPolicy
    api_key: str | None = None
    max_queue: int = 32
    decode_ahead: int = 2  # videos decoded before their turn, while the model answers another request
    prior_cache: bool = True  # the on-disk positional-prior cache
    cache_gb: float = 4.0  # the per-video cache (frames, vision output, prompt start); 0: off
    # A client that sends slowly or stalls gets a 408 and its connection closed (app.py): the
    # request's headers must be in within header_seconds, its body must not pause longer than
    # body_idle_seconds and must be in within body_seconds (300 s: 100 MB at 333 KB/s).
    header_seconds: float = 10.0
    body_idle_seconds: float = 10.0
    body_seconds: float = 300.0


@dataclass
class Question:
    text: str
    source: VideoSource
    plan: Plan
    stream: bool
    include_usage: bool


@dataclass
class Service:
    loaded: object
    settings: Settings
    worker: Worker = field(init=False)
    store: object = field(init=False)
    cache: object = field(init=False)
    upload_dir: Path | None = None
    created: int = field(default_factory=now)  # what /v1/models says

    def __post_init__(self):
        from sharp_cli.prune.prior import PriorStore

        self.worker = Worker(self.settings.max_queue, ahead=self.settings.decode_ahead)
        self.store = PriorStore(use_disk=self.settings.prior_cache)  # one per server: priors are per layout
        self.cache = VideoCache(int(self.settings.cache_gb * 2**30)) if self.settings.cache_gb > 0 else None

    @property
    def model_id(self) -> str:
        return self.settings.model_ids[0]

    def start(self) -> None:
        self.upload_dir = Path(tempfile.mkdtemp(prefix="sharp-serve-uploads-"))
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        if self.upload_dir is not None:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    # -- the steps of one request ----------------------------------------------------------------
    def check(self, request: ChatRequest) -> Question:
        """Everything that can be refused before the video is read; ApiError otherwise."""
        if request.model is not None and request.model not in self.settings.model_ids:
            raise ApiError(404, f"The model '{request.model}' does not exist: this server serves "
                           f"'{self.model_id}'", "model_not_found", param="model")
        text, url = question_and_video(request)
        try:
            plan = resolve(request, self.settings.defaults, self.loaded)
        except UsageError as exc:
            raise ApiError(400, as_field_names(str(exc)), "invalid_value") from None
        source = self.settings.media.source(url)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Question(text, source, plan, request.stream, include_usage)

    def save_upload(self, question: Question) -> Question:
        """An upload written to its temporary file (blocking: runs in a thread)."""
        question.source = question.source.save(self.upload_dir)
        return question

    def decode(self, question: Question):
        """The sampled frames (blocking: runs in a thread); an upload's temporary file is removed
        as soon as its frames are in memory."""
        from sharp_cli.clip_budget import ClipBudget
        from sharp_cli.video import load_video, probe

        source, plan = question.source, question.plan
        fit, limits = ClipBudget.of(self.loaded), dict(question=question.text, max_new_tokens=plan.max_new_tokens)
        path = source.path
        try:
            with source.opened() as path:  # a local file: opened once, checked, read as opened
                info = probe(path)  # a clip over the model's context is refused before it is decoded
                video = fit.plan(info, plan.video, **limits)  # decoded no larger than the model keeps
                if self.cache is not None and not source.temporary:  # an upload is one-off: not kept
                    clip = self.cache.load_video(path, **video)
                else:
                    clip = load_video(path, **video)
            fit.check_clip(clip, plan.video.get("max_pixels"), info, **limits)
            return clip
        except VideoError as exc:  # the client named its file or upload, not our file descriptor or temporary file
            raise VideoError(str(exc).replace(path, source.label).replace(source.path, source.label)) from None
        finally:
            source.discard()

    def work(self, clip, question: Question):
        """The model call, as the worker thread runs it: returns (sharp record, finish reason)."""

        def run(on_text, cancelled):
            from sharp_cli import answer as answer_mod
            from sharp_cli import report

            plan, failure = question.plan, None
            try:
                answer = answer_mod.ask(self.loaded, clip, question.text, plan.cfg,
                                        max_new_tokens=plan.max_new_tokens, max_pixels=plan.video.get("max_pixels"),
                                        store=self.store, on_text=on_text, cancel=cancelled, sampling=plan.sampling,
                                        cache=self.cache)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failure = ApiError(500, describe(exc), "out_of_memory")
            if failure is not None:
                release_gpu_memory()
                raise failure
            record = report.ask_record(self.loaded, clip, plan.cfg, answer)
            record["video"] = question.source.label
            finish = "length" if answer.decoded.stop == "length" else "stop"  # EOS (or a client gone)
            return record, finish

        return run


def api_error(exc: BaseException) -> ApiError:
    """Any failure of a request as the error it is sent back as."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UsageError):
        return ApiError(400, as_field_names(one_line(str(exc))), "invalid_value")
    if isinstance(exc, VideoError):
        return ApiError(400, one_line(str(exc)), "invalid_video", param="video_url")
    if isinstance(exc, SharpError):
        return ApiError(500, one_line(str(exc)), "model_error")
    if os.environ.get("SHARP_DEBUG") not in (None, "", "0"):
        log.error("request failed", exc_info=exc)
    else:
        log.error("request failed: %s", one_line(describe(exc)))
    if is_out_of_memory(exc):
        return ApiError(500, one_line(describe(exc)), "out_of_memory")
    return ApiError(500, one_line(describe(exc)), "internal_error")

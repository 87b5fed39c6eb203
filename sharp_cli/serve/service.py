"""What `sharp serve` holds and does besides HTTP: the loaded model, its worker thread and prior
store, the media policy, and the steps of one request (check, decode the video, answer)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sharp_cli.errors import (
    SharpError,
    UsageError,
    VideoError,
    debug_enabled,
    describe,
    is_out_of_memory,
    one_line,
    release_gpu_memory,
)
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
    max_batch: int = 1  # answers decoded together (scheduler.py); 1: one at a time
    kv_gb: float | None = None  # KV cache budget of the batch (None: a share of the free GPU memory)
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
    video_seconds: float | None = None  # decoding its frames took this long
    inputs: object = None  # the processor's, made in the decoding thread (answer.inputs_ahead); taken once


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

        settings = self.settings
        if settings.max_batch > 1:
            from sharp_cli.serve.batched import BatchWorker

            self.worker = BatchWorker(settings.max_queue, settings.decode_ahead, self.scheduler, settings.max_batch)
        else:
            self.worker = Worker(settings.max_queue, ahead=settings.decode_ahead)
        self.store = PriorStore(use_disk=self.settings.prior_cache)  # one per server: priors are per layout
        self.cache = VideoCache(int(self.settings.cache_gb * 2**30)) if self.settings.cache_gb > 0 else None

    def scheduler(self):
        """The scheduler that decodes answers together (made in the model's thread)."""
        from sharp_cli.scheduler import Scheduler

        kv_gb = self.settings.kv_gb
        return Scheduler(self.loaded, max_batch=self.settings.max_batch, store=self.store, cache=self.cache,
                         kv_bytes=int(kv_gb * 2**30) if kv_gb else None)

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
        import time

        from sharp_cli import answer
        from sharp_cli.clip_budget import ClipBudget
        from sharp_cli.video import load_video, probe

        source, plan, started = question.source, question.plan, time.perf_counter()
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
        except VideoError as exc:  # the client named its file or upload, not our file descriptor or temporary file
            raise VideoError(str(exc).replace(path, source.label).replace(source.path, source.label)) from None
        finally:
            source.discard()
        question.video_seconds = time.perf_counter() - started
        # Still in this thread, not the model's: the processor's work on the frames (answer.inputs_ahead).
        question.inputs = answer.inputs_ahead(self.loaded, clip, question.text, plan.video.get("max_pixels"),
                                              self.cache)
        return clip

    def work(self, clip, question: Question) -> "Work":
        """The model's part of a request, as the worker thread runs it (alone, or batched)."""
        return Work(self, clip, question)


class Work:
    """Called (on_text, cancelled) -> (sharp record, finish reason), it answers alone (answer.ask);
    a BatchWorker instead hands request() to its scheduler and result() or failure() the outcome."""

    def __init__(self, service: Service, clip, question: Question):
        self.service, self.clip, self.question = service, clip, question

    def __call__(self, on_text, cancelled):
        from sharp_cli import answer as answer_mod

        plan, service, failure = self.question.plan, self.service, None
        try:
            answer = answer_mod.ask(service.loaded, self.clip, self.question.text, plan.cfg,
                                    max_new_tokens=plan.max_new_tokens, max_pixels=plan.video.get("max_pixels"),
                                    store=service.store, on_text=on_text, cancel=cancelled, sampling=plan.sampling,
                                    cache=service.cache, inputs=self.take_inputs())
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failure = exc
        if failure is not None:  # here, not in the except block: the traceback's tensors are gone
            raise self.failure(failure)
        return self.result(answer)

    def request(self, on_text, cancelled):
        from sharp_cli.scheduler import Request

        plan = self.question.plan
        return Request(self.clip, self.question.text, plan.cfg, max_new_tokens=plan.max_new_tokens,
                       max_pixels=plan.video.get("max_pixels"), sampling=plan.sampling, on_text=on_text,
                       cancel=cancelled, inputs=self.take_inputs())

    def take_inputs(self):
        """The processor inputs made ahead, handed over once (the question no longer holds the pixels)."""
        inputs, self.question.inputs = self.question.inputs, None
        return inputs

    def failure(self, exc: BaseException) -> BaseException:
        """The exception a failed answer is reported as: out of GPU memory is a 500 with advice
        (the allocator's cache given back first, so the next request starts clean)."""
        if not is_out_of_memory(exc):
            return exc
        exc.__traceback__ = None  # its frames hold the failed call's tensors
        release_gpu_memory()
        return ApiError(500, describe(exc), "out_of_memory")

    def result(self, answer):
        from sharp_cli import report

        question = self.question
        record = report.ask_record(self.service.loaded, self.clip, question.plan.cfg, answer)
        record["video"] = question.source.label
        if question.video_seconds is not None:
            record["video_seconds"] = question.video_seconds
        finish = "length" if answer.decoded.stop == "length" else "stop"  # EOS (or a client gone)
        return record, finish


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
    if debug_enabled():
        log.error("request failed", exc_info=exc)
    else:
        log.error("request failed: %s", one_line(describe(exc)))
    if is_out_of_memory(exc):
        return ApiError(500, one_line(describe(exc)), "out_of_memory")
    return ApiError(500, one_line(describe(exc)), "internal_error")

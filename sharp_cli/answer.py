"""One question end to end: prepare -> encode -> positional prior -> prefill -> decode.

ask() answers a question (streaming, cancelling, a per-video cache); run() is the same pipeline as
one timed pass, which bench, the GPU checks and the profilers call; begin()/prefill()/finish() are
its parts for the scheduler, which decodes many questions together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sharp_cli import engine, measure
from sharp_cli.decode import MIN_STEPS_TO_CAPTURE, Decoded, decode
from sharp_cli.engine import Prefill
from sharp_cli.loading import Loaded
from sharp_cli.prior_pass import PriorInfo, positional_prior
from sharp_cli.prune.config import PruneConfig, require_resolved
from sharp_cli.prune.prior import PriorStore
from sharp_cli.sampling import Rules, Sampling, rules_for
from sharp_cli.text_stream import TextStream


@dataclass
class Answer:
    text: str
    tokens: list[int]
    encoded: object
    prefill: Prefill
    vision_seconds: float
    decoded: Decoded
    prior: PriorInfo
    peak_memory_bytes: int | None
    seconds: float = 0.0  # wall clock from the vision encoder to the last token
    extra: dict = field(default_factory=dict)
    prepare_seconds: float = 0.0  # the processor's work on the frames and prompt (before `seconds`; maybe ahead)

    @property
    def decode_seconds(self) -> float:
        return self.decoded.seconds


def ask(loaded: Loaded, clip, question: str, cfg: PruneConfig, *, max_new_tokens: int = 128,
        max_pixels: int | None = None, store: PriorStore | None = None, warmup: int = 0,
        on_text=None, cancel=None, sampling: Sampling | None = None, cache=None, inputs=None) -> Answer:
    """One question end to end. `warmup` untimed passes first: a fresh CUDA process spends most of
    its first prefill loading kernels, which says nothing about the method. on_text(piece) gets the
    answer as it is decoded (the pieces join to Answer.text); cancel() is asked between tokens and
    ends the answer early when it says True (a client that went away). cfg: resolved for this model
    (loaded.resolve_prune), by the command that made it. cache: a VideoCache (for a
    clip it loaded) that keeps the vision output and the prompt's question-independent start.
    inputs: the processor's, made ahead (begin)."""
    require_resolved(cfg, "answer.ask")
    rules = rules_for(loaded.model, loaded.processor.tokenizer, sampling)
    if rules.sampling.seed is not None:
        _seed(rules.sampling.seed, loaded.device)
    if warmup:
        _warm_up(loaded, clip, question, cfg, rules, max_new_tokens, max_pixels, store or PriorStore(), cache,
                 warmup)
    begun = begin(loaded, clip, question, cfg, max_new_tokens=max_new_tokens, max_pixels=max_pixels, store=store,
                  rules=rules, cache=cache, inputs=inputs)
    prefill(begun)
    stream = TextStream(loaded.processor.tokenizer, on_text)
    decoded = decode(loaded, begun.encoded, begun.state, max_new_tokens, prompt_ids=begun.prompt_ids, rules=rules,
                     on_token=lambda t: t in rules.eos or stream.push(t), should_stop=cancel)  # EOS is not text
    return finish(begun, decoded, stream)


@dataclass
class Begun:
    """A question up to its prefill: what the decode phase (one at a time, or batched by
    scheduler.py) starts from. `state` is set by prefill()."""

    loaded: Loaded
    clip: object
    cfg: PruneConfig
    rules: Rules
    max_new_tokens: int
    max_pixels: int | None
    cache: object  # the VideoCache, or None
    prompt_ids: object  # (1, L)
    encoded: object
    vision_seconds: float
    prior: PriorInfo
    features_cached: bool
    started: float  # perf_counter when the vision encoder started
    state: Prefill | None = None
    prefix_used: bool = False
    prepare_seconds: float = 0.0  # the processor's work, here or ahead in another thread (inputs_ahead)


def begin(loaded: Loaded, clip, question: str, cfg: PruneConfig, *, max_new_tokens: int = 128,
          max_pixels: int | None = None, store: PriorStore | None = None, rules: Rules | None = None,
          cache=None, reset_peak: bool = True, inputs=None) -> Begun:
    """Prompt, vision encoder (or its cached output) and positional prior: everything before prefill.
    cfg must be resolved (loaded.resolve_prune). Peak memory counts from here (reset_peak: when many
    questions share the device at once, the caller keeps one count for all). inputs: this question's
    engine.prepare(..., to_device=False), made ahead in another thread; unused when the video's
    vision output is cached (its layout is cheaper than moving the pixels)."""
    require_resolved(cfg, "answer.begin")
    rules = rules or rules_for(loaded.model, loaded.processor.tokenizer)
    store = store or PriorStore()
    # A cached video: its vision output, and its layout, so the frames are not processed again.
    features, layout = (cache.vision(loaded, clip, max_pixels) if cache is not None else None) or (None, None)
    prepared = time.perf_counter()
    ahead = getattr(inputs, "sharp_prepare_seconds", 0.0) if inputs is not None and features is None else 0.0
    if inputs is None or features is not None:
        inputs = engine.prepare(loaded, clip, question, max_pixels, layout=layout)
    else:
        inputs = inputs.to(loaded.device)
    prepare_s = ahead + time.perf_counter() - prepared
    if reset_peak:
        measure.reset_peak_memory(loaded.device)
    measure.synchronize(loaded.device)
    started = time.perf_counter()
    encoded, vision_s = engine.encode(loaded, inputs, features)
    prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
    if cache is not None and features is None:
        cache.put_vision(loaded, clip, max_pixels, encoded.features, engine.video_layout(loaded, inputs))
    return Begun(loaded, clip, cfg, rules, max_new_tokens, max_pixels, cache, inputs["input_ids"], encoded, vision_s,
                 prior, features is not None, started, prepare_seconds=prepare_s)


def inputs_ahead(loaded: Loaded, clip, question: str, max_pixels: int | None = None, cache=None):
    """engine.prepare's work for a question about to be asked (the processor's resize, normalise and
    patchify of every frame: CPU time that would otherwise stall the GPU between requests), done in
    the caller's thread, a decoding thread of batch or serve; for begin(inputs=...). None when the
    video's vision output is cached: begin then rebuilds the prompt from its layout."""
    if cache is not None and cache.knows_vision(loaded, clip, max_pixels):
        return None
    started = time.perf_counter()
    inputs = engine.prepare(loaded, clip, question, max_pixels, to_device=False)
    inputs.sharp_prepare_seconds = time.perf_counter() - started  # reported with the answer (begin)
    return inputs


def prefill(begun: Begun, kv=None) -> Prefill:
    """The prefill of a begun question (reusing the video's cached prompt start where there is one),
    into `kv` (an empty kv.StaticKV with room for engine.cache_lengths) or a cache from the pool."""
    loaded, cfg = begun.loaded, begun.cfg
    prefix, keep = _prefix(loaded, begun.clip, cfg, begun.max_pixels, begun.prompt_ids, begun.encoded, begun.cache)
    state = engine.prefill(loaded, begun.encoded, cfg, prior=begun.prior.prior, new_tokens=begun.max_new_tokens,
                           prefix=prefix, keep_prefix=keep, cache=kv)
    if begun.cache is not None and state.prefix is not None:
        begun.cache.put_prefix(loaded, begun.clip, cfg, begun.max_pixels, state.prefix)
    begun.state, begun.prefix_used = state, prefix is not None
    return state


def finish(begun: Begun, decoded: Decoded, stream: TextStream, extra: dict | None = None) -> Answer:
    """The Answer of a question whose decoding is over (stream.finish() not yet called)."""
    stream.finish()
    seconds = time.perf_counter() - begun.started  # decode read its last token: nothing left in flight that counts
    rules, loaded = begun.rules, begun.loaded
    return Answer(
        text=stream.text().strip(), tokens=decoded.tokens, encoded=begun.encoded, prefill=begun.state,
        vision_seconds=begun.vision_seconds, decoded=decoded, prior=begun.prior,
        peak_memory_bytes=measure.peak_memory_bytes(loaded.device), seconds=seconds,
        prepare_seconds=begun.prepare_seconds,
        extra={**({"ignored_generation_settings": list(rules.ignored)} if rules.ignored else {}),
               **({"cache": {"vision": begun.features_cached, "prefix": begun.prefix_used}}
                  if begun.cache is not None else {}), **(extra or {})},
    )


@dataclass
class Run:
    """One pass of the question pipeline (run()), phase by phase; seconds on device clocks."""

    prompt_ids: object  # (1, L)
    encoded: object
    prior: PriorInfo
    prefill: Prefill
    decoded: Decoded | None  # None for a prefill-only pass (new_tokens=0)
    vision_seconds: float
    seconds: float  # wall clock, device synchronised, from the vision encoder to the last token
    prepare_seconds: float = 0.0  # the processor (0 when the caller gave the inputs)

    @property
    def tokens(self) -> list[int]:
        return self.decoded.tokens if self.decoded is not None else []

    @property
    def decode_seconds(self) -> float:
        return self.decoded.seconds if self.decoded is not None else 0.0


def run(loaded: Loaded, clip, question: str, cfg: PruneConfig, new_tokens: int, *, inputs=None, features=None,
        room: int | None = None, max_pixels: int | None = None, store: PriorStore | None = None,
        rules: Rules | None = None, forced_keep=None, ignore_eos: bool = False, keep_logits: bool = False,
        reset_peak: bool = True) -> Run:
    """The question pipeline as one call: (prepare ->) encode -> positional prior -> prefill ->
    decode of up to `new_tokens` (0: prefill only; ignore_eos: exactly new_tokens, EOS or not),
    each phase timed. What bench times, the GPU checks compare and the profilers break down; ask()
    is the same phases with streaming, a per-video cache and cancelling on top.

    inputs: engine.prepare's output, when one preparation serves many passes (features: the vision
    output for them). room: tokens the KV cache keeps room for (default new_tokens). forced_keep:
    keep exactly these visual tokens (sorted token numbers) instead of choosing."""
    require_resolved(cfg, "answer.run")
    rules = rules or rules_for(loaded.model, loaded.processor.tokenizer)
    prepare_s = 0.0
    if inputs is None:
        started = time.perf_counter()
        inputs = engine.prepare(loaded, clip, question, max_pixels)
        prepare_s = time.perf_counter() - started
    if reset_peak:
        measure.reset_peak_memory(loaded.device)
    measure.synchronize(loaded.device)
    started = time.perf_counter()
    encoded, vision_s = engine.encode(loaded, inputs, features)
    prior = positional_prior(loaded, clip, encoded, cfg, store or PriorStore(use_disk=False), max_pixels)
    state = engine.prefill(loaded, encoded, cfg, prior=prior.prior, forced_keep=forced_keep,
                           new_tokens=room if room is not None else new_tokens)
    decoded = None
    if new_tokens > 0:
        decoded = decode(loaded, encoded, state, new_tokens, prompt_ids=inputs["input_ids"], rules=rules,
                         ignore_eos=ignore_eos, keep_logits=keep_logits)
    measure.synchronize(loaded.device)
    return Run(inputs["input_ids"], encoded, prior, state, decoded, vision_s, time.perf_counter() - started, prepare_s)


def _warm_up(loaded, clip, question, cfg, rules, max_new_tokens, max_pixels, store, cache, passes: int) -> None:
    features, layout = (cache.vision(loaded, clip, max_pixels) if cache is not None else None) or (None, None)
    inputs = engine.prepare(loaded, clip, question, max_pixels, layout=layout)
    if loaded.graphs is not None:
        loaded.graphs.capture_after = 0  # warming up says the length will be reused: capture now
    for _ in range(passes):  # a cache as long as the answer's, enough steps to capture its decode graph
        run(loaded, clip, question, cfg, min(max_new_tokens, MIN_STEPS_TO_CAPTURE + 1), inputs=inputs,
            features=features, room=max_new_tokens, max_pixels=max_pixels, store=store, rules=rules,
            ignore_eos=True, reset_peak=False)


def _prefix(loaded, clip, cfg, max_pixels, prompt_ids, encoded, cache):
    """(cached prefix to reuse or None, ids of the prefix to keep for next time or None)."""
    if cache is None or (cfg.prunes and cfg.layer == 0):  # evs prunes before layer 0: no layers to reuse
        return None, None
    n = engine.prefix_length(loaded, prompt_ids)
    if not 0 < n < encoded.layout.seq_len:
        return None, None
    ids = prompt_ids[0, :n]
    found = cache.prefix(loaded, clip, cfg, max_pixels, ids)
    return (found, None) if found is not None else (None, ids)


def _seed(seed: int, device) -> None:
    import torch

    torch.manual_seed(seed)  # CPU sampling; also seeds every CUDA device's default generator

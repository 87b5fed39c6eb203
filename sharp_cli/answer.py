"""One question end to end: prepare -> encode -> positional prior -> prefill -> decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sharp_cli import engine, measure
from sharp_cli.decode import MIN_STEPS_TO_CAPTURE, Decoded, decode
from sharp_cli.engine import Prefill
from sharp_cli.loading import Loaded
from sharp_cli.prior_pass import PriorInfo, positional_prior
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.prior import PriorStore
from sharp_cli.sampling import Sampling, rules_for
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

    @property
    def decode_seconds(self) -> float:
        return self.decoded.seconds


def ask(loaded: Loaded, clip, question: str, cfg: PruneConfig, *, max_new_tokens: int = 128,
        max_pixels: int | None = None, store: PriorStore | None = None, warmup: int = 0,
        on_text=None, cancel=None, sampling: Sampling | None = None, cache=None) -> Answer:
    """One question end to end. `warmup` untimed passes first: a fresh CUDA process spends most of
    its first prefill loading kernels, which says nothing about the method. on_text(piece) gets the
    answer as it is decoded (the pieces join to Answer.text); cancel() is asked between tokens and
    ends the answer early when it says True (a client that went away). cache: a VideoCache (for a
    clip it loaded) that keeps the vision output and the prompt's question-independent start."""
    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)
    rules = rules_for(loaded.model, loaded.processor.tokenizer, sampling)
    if rules.sampling.seed is not None:
        _seed(rules.sampling.seed, loaded.device)
    store = store or PriorStore()
    # A cached video: its vision output, and its layout, so the frames are not processed again.
    features, layout = (cache.vision(loaded, clip, max_pixels) if cache is not None else None) or (None, None)
    inputs = engine.prepare(loaded, clip, question, max_pixels, layout=layout)
    prompt_ids = inputs["input_ids"]
    if warmup and loaded.graphs is not None:
        loaded.graphs.capture_after = 0  # warming up says the length will be reused: capture now
    for _ in range(warmup):
        encoded, _ = engine.encode(loaded, inputs, features)
        prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
        state = engine.prefill(loaded, encoded, cfg, prior=prior.prior, new_tokens=max_new_tokens)
        decode(loaded, encoded, state, min(max_new_tokens, MIN_STEPS_TO_CAPTURE + 1), prompt_ids=prompt_ids,
               rules=rules, ignore_eos=True)  # enough steps to capture the decode graph
    measure.reset_peak_memory(loaded.device)
    measure.synchronize(loaded.device)
    started = time.perf_counter()
    encoded, vision_s = engine.encode(loaded, inputs, features)
    prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
    prefix, keep = _prefix(loaded, clip, cfg, max_pixels, prompt_ids, encoded, cache)
    state = engine.prefill(loaded, encoded, cfg, prior=prior.prior, new_tokens=max_new_tokens, prefix=prefix,
                           keep_prefix=keep)
    if cache is not None:
        if features is None:
            cache.put_vision(loaded, clip, max_pixels, encoded.features, engine.video_layout(loaded, inputs))
        if state.prefix is not None:
            cache.put_prefix(loaded, clip, cfg, max_pixels, state.prefix)
    stream = TextStream(loaded.processor.tokenizer, on_text)
    decoded = decode(loaded, encoded, state, max_new_tokens, prompt_ids=prompt_ids, rules=rules,
                     on_token=lambda t: t in rules.eos or stream.push(t), should_stop=cancel)  # EOS is not text
    stream.finish()
    seconds = time.perf_counter() - started  # decode read its last token: nothing left in flight that counts
    return Answer(
        text=stream.text().strip(), tokens=decoded.tokens, encoded=encoded, prefill=state, vision_seconds=vision_s,
        decoded=decoded, prior=prior, peak_memory_bytes=measure.peak_memory_bytes(loaded.device), seconds=seconds,
        extra={**({"ignored_generation_settings": list(rules.ignored)} if rules.ignored else {}),
               **({"cache": {"vision": features is not None, "prefix": prefix is not None}}
                  if cache is not None else {})},
    )


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

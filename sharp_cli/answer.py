"""One question end to end: prepare -> encode -> positional prior -> prefill -> decode."""

from __future__ import annotations

from dataclasses import dataclass, field

from sharp_cli import engine, measure
from sharp_cli.decode import decode
from sharp_cli.engine import Prefill
from sharp_cli.loading import Loaded
from sharp_cli.prior_pass import PriorInfo, positional_prior
from sharp_cli.prune.config import PruneConfig
from sharp_cli.errors import UsageError
from sharp_cli.prune.prior import PriorStore
from sharp_cli.sampling import Sampling
from sharp_cli.text_stream import TextStream


@dataclass
class Answer:
    text: str
    tokens: list[int]
    encoded: object
    prefill: Prefill
    vision_seconds: float
    decode_seconds: float
    prior: PriorInfo
    peak_memory_bytes: int | None
    extra: dict = field(default_factory=dict)


def ask(loaded: Loaded, clip, question: str, cfg: PruneConfig, *, max_new_tokens: int = 128,
        max_pixels: int | None = None, store: PriorStore | None = None, warmup: int = 0,
        on_text=None, cancel=None, sampling: Sampling | None = None) -> Answer:
    """One question end to end. `warmup` untimed passes first: a fresh CUDA process spends most of
    its first prefill loading kernels, which says nothing about the method. on_text(piece) gets the
    answer as it is decoded (the pieces join to Answer.text); cancel() is asked between tokens and
    ends the answer early when it says True (a client that went away)."""
    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)
    sampling = (sampling or Sampling()).validate()
    if not sampling.greedy:
        raise UsageError("sampling is not implemented yet; use --temperature 0")
    store = store or PriorStore()
    inputs = engine.prepare(loaded, clip, question, max_pixels)
    if warmup and loaded.graphs is not None:
        loaded.graphs.capture_after = 0  # warming up says the length will be reused: capture now
    for _ in range(warmup):
        encoded, _ = engine.encode(loaded, inputs)
        prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
        decode(loaded, encoded, engine.prefill(loaded, encoded, cfg, prior=prior.prior), 2)
    measure.reset_peak_memory(loaded.device)
    encoded, vision_s = engine.encode(loaded, inputs)
    prior = positional_prior(loaded, clip, encoded, cfg, store, max_pixels)
    state = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
    stream = TextStream(loaded.processor.tokenizer, on_text)
    tokens, decode_s = decode(loaded, encoded, state, max_new_tokens, on_token=stream.push, should_stop=cancel)
    stream.finish()
    text = stream.text().strip()
    return Answer(
        text=text, tokens=tokens, encoded=encoded, prefill=state, vision_seconds=vision_s,
        decode_seconds=decode_s, prior=prior, peak_memory_bytes=measure.peak_memory_bytes(loaded.device),
    )

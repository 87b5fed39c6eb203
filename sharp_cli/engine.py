"""The phases of one answer, each a small function that can be timed alone (gpt-fast style):
prepare (prompt + frames -> processor tensors) -> encode (vision encoder) -> prefill (the text
model, with pruning) -> decode (sharp_cli/decode.py).

Pruning happens inside prefill through forward pre-hooks (prune/session.py); the model code is
transformers' own.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sharp_cli import measure
from sharp_cli.compat import cache_kwargs
from sharp_cli.errors import UsageError
from sharp_cli.loading import Loaded
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.session import PruneSession


def prepare(loaded: Loaded, clip, question: str, max_pixels: int | None = None):
    """Prompt + frames -> processor tensors on the device (whole: mm_token_type_ids included)."""
    if not question or not question.strip():
        raise UsageError("the question is empty")
    prompt = loaded.adapter.prompt(loaded.processor, question)
    inputs = loaded.adapter.processor_inputs(loaded.processor, prompt, clip, max_pixels)
    return inputs.to(loaded.device)


@torch.inference_mode()
def encode(loaded: Loaded, inputs):
    """Vision encoder + embeddings + positions; returns (Encoded, vision seconds)."""
    watch = measure.Stopwatch(loaded.device)
    with watch:
        encoded = loaded.adapter.encode(loaded.model, inputs)
    return encoded, watch.seconds


@dataclass
class Prefill:
    cache: object
    next_token: torch.Tensor  # (1, 1)
    logits: torch.Tensor  # (1, 1, vocab) at the last position
    seconds: float
    selection_seconds: float
    kept: torch.Tensor | None  # kept visual token numbers
    kept_len: int  # sequence length seen by layers K..L-1
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    session: PruneSession | None = None


@torch.inference_mode()
def prefill(loaded: Loaded, encoded, cfg: PruneConfig, prior=None, forced_keep=None) -> Prefill:
    from transformers import DynamicCache

    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)  # K resolved when not given
    text = loaded.adapter.text_model(loaded.model)
    cache = DynamicCache(config=text.config)
    select_watch = measure.Stopwatch(loaded.device)
    session = None
    if cfg.prunes:
        session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, prior=prior,
                               forced_keep=forced_keep, timer=select_watch, graphs=loaded.graphs)
    watch = measure.Stopwatch(loaded.device)
    with watch, (session or nullcontext()):
        out = text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids,
                   use_cache=True, **cache_kwargs(text, cache), **encoded.extra)
        logits = loaded.adapter.lm_head(loaded.model)(out.last_hidden_state[:, -1:])
        token = logits.argmax(-1)
    kept = session.kept if session else None
    kept_len = session.keep_positions.numel() if session else encoded.layout.seq_len
    kv = measure.kv_cache_bytes(cache)
    kv_full = measure.kv_cache_bytes_unpruned(cache, len(loaded.adapter.decoder_layers(loaded.model)))
    return Prefill(cache, token, logits, watch.seconds, select_watch.seconds, kept, kept_len, kv, kv_full, session)

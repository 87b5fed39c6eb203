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
from sharp_cli.prune.config import PruneConfig, keep_count
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
    cache: object  # kv.StaticKV: valid until the next prefill on the same loaded model reuses it
    logits: torch.Tensor  # (1, 1, vocab) at the last position
    seconds: float
    selection_seconds: float
    kept: torch.Tensor | None  # kept visual token numbers
    kept_len: int  # sequence length seen by layers K..L-1
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    session: PruneSession | None = None


def cache_lengths(loaded: Loaded, encoded, cfg: PruneConfig, new_tokens: int, forced_keep=None) -> list[int]:
    """Rows each layer's KV cache must hold: the prompt in layers 0..K-1, the text and the kept
    visual tokens from K on, plus the tokens still to be decoded."""
    layout, layers = encoded.layout, loaded.num_layers
    if not cfg.prunes:
        return [layout.seq_len + new_tokens] * layers
    kept = forced_keep.numel() if forced_keep is not None else keep_count(cfg.ratio, layout.num_visual)
    short = layout.seq_len - layout.num_visual + kept
    return [layout.seq_len + new_tokens] * cfg.layer + [short + new_tokens] * (layers - cfg.layer)


@torch.inference_mode()
def prefill(loaded: Loaded, encoded, cfg: PruneConfig, prior=None, forced_keep=None, new_tokens: int = 1) -> Prefill:
    """The text model over the whole prompt (pruning at layer K), into a preallocated KV cache with
    room for `new_tokens` more; returns the last position's logits."""
    cfg = loaded.adapter.validate_prune(cfg, loaded.num_layers)  # K resolved when not given
    text = loaded.adapter.text_model(loaded.model)
    dims = loaded.dims
    cache = loaded.kv_pool.acquire(cache_lengths(loaded, encoded, cfg, max(1, new_tokens), forced_keep),
                                   dims["kv_heads"], dims["head_dim"], encoded.inputs_embeds.dtype, loaded.device)
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
    kept = session.kept if session else None
    kept_len = session.keep_positions.numel() if session else encoded.layout.seq_len
    unpruned = loaded.num_layers * encoded.layout.seq_len * cache.bytes_per_row()
    return Prefill(cache, logits, watch.seconds, select_watch.seconds, kept, kept_len, cache.bytes_used(), unpruned,
                   session)

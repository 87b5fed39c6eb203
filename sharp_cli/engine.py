"""The phases of one answer, each a small function that can be timed alone (gpt-fast style):
prepare (prompt + frames -> processor tensors) -> encode (vision encoder) -> prefill (the text
model, with pruning) -> decode (sharp_cli/decode.py).

Pruning happens inside prefill through forward pre-hooks (prune/session.py); the model code is
transformers' own.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sharp_cli import measure
from sharp_cli.compat import cache_kwargs
from sharp_cli.errors import UsageError
from sharp_cli.loading import Loaded
from sharp_cli.prune.config import PruneConfig, keep_count, require_resolved
from sharp_cli.prune.session import PruneSession

# On CUDA the video processor resizes and normalises the frames on the GPU (transformers' `device`
# video kwarg): on the CPU that work is a sizeable share of an answer, serial with the GPU
# (docs/benchmarks.md, "The video processor"), and the float32 pixels it hands over are 4x the
# uint8 frames sent instead. Off (on the CPU, as a stock script does) until the GPU check has passed:
# SHARP_PROCESS_ON_GPU=1 turns it on.
PROCESS_ON_GPU = "SHARP_PROCESS_ON_GPU"
PROCESS_ON_GPU_DEFAULT = "0"  # becomes "1" once research/gpu-notes.md's processor check has passed


def processing_device(loaded: Loaded):
    """Where the video processor works: the model's GPU, or None (the CPU)."""
    on = loaded.device.type == "cuda" and os.environ.get(PROCESS_ON_GPU, PROCESS_ON_GPU_DEFAULT) == "1"
    return loaded.device if on else None


def prepare(loaded: Loaded, clip, question: str, max_pixels: int | None = None, layout: dict | None = None, *,
            to_device: bool = True):
    """Prompt + frames -> processor tensors on the device (whole: mm_token_type_ids included).
    layout: the video's layout from an earlier call (video_layout), when its vision output is at
    hand: then the frames are not processed again and the inputs carry no pixels. to_device=False:
    left where the processor made them, for a thread that prepares the next request while the
    model answers the current ones (answer.begin(inputs=...) moves them)."""
    if not question or not question.strip():
        raise UsageError("the question is empty")
    prompt = loaded.adapter.prompt(loaded.processor, question)
    inputs = None
    if layout is not None:
        inputs = loaded.adapter.layout_inputs(loaded.processor, prompt, layout)
    if inputs is None:
        inputs = loaded.adapter.processor_inputs(loaded.processor, prompt, clip, max_pixels,
                                                 processing_device(loaded))
    return inputs.to(loaded.device) if to_device else inputs


def video_layout(loaded: Loaded, inputs) -> dict | None:
    """The part of a full call's inputs that prepare(layout=...) rebuilds a prompt from."""
    keys = loaded.adapter.layout_keys
    if not keys or not all(k in inputs for k in keys):
        return None
    return {**{k: inputs[k] for k in keys}, "token_types": "mm_token_type_ids" in inputs}


@torch.inference_mode()
def encode(loaded: Loaded, inputs, features=None):
    """Vision encoder (unless its output for this video is given) + embeddings + positions;
    returns (Encoded, seconds). Encoded.features keeps the vision output for a per-video cache."""
    watch = measure.Stopwatch(loaded.device)
    with watch:
        if features is None:
            with loaded.vision_context():
                features = loaded.adapter.vision(loaded.model, inputs)
        encoded = loaded.adapter.encode(loaded.model, inputs, features)
    encoded.features = features
    return encoded, watch.seconds


@dataclass
class Prefix:
    """The question-independent start of a prompt (system text and the video, up to its last token)
    after layers 0..n-1: what a later question about the same video does not need to recompute.
    Unpruned, n is every layer; pruned at K, n = K, plus layer K's input rows and their rotary
    embeddings, since layer K scores and prunes the whole sequence."""

    ids: torch.Tensor  # (P,) prompt token ids of the prefix: a question reuses it only if its own start equal them
    kv: list  # (keys, values) of rows [:P], for layers 0..n-1
    hidden: torch.Tensor | None = None  # (1, P, D) input of layer K
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.kv for t in kv] + [t for t in (self.hidden, self.cos, self.sin) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def prefix_length(loaded: Loaded, prompt_ids) -> int:
    """Rows up to and including the video's last token (LLaVA's closing newline is one of them)."""
    video = (prompt_ids.reshape(-1) == loaded.model.config.video_token_id).nonzero()
    return int(video.max()) + 1 if video.numel() else 0


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
    prefix: "Prefix | None" = None  # the prompt's question-independent start, when asked for


def cache_lengths(loaded: Loaded, encoded, cfg: PruneConfig, new_tokens: int, forced_keep=None) -> list[int]:
    """Rows each layer's KV cache must hold: the prompt in layers 0..K-1, the text and the kept
    visual tokens from K on, plus the tokens still to be decoded."""
    layout, layers = encoded.layout, loaded.num_layers
    if not cfg.prunes:
        full = layout.seq_len + new_tokens
        if loaded.compiled:
            # Dynamo's duck sizing gives equal lengths one symbol: a compiled step first traced on
            # an all-equal cache guards that every layer is as long as layer 0, and the first pruned
            # answer compiles again (53-63 s on an H200). A bucket more in layers 0..K-1 gives it the two
            # lengths a pruned cache has. (Duck sizing off instead: the first compile took 290 s, not 82.)
            from sharp_cli.kv import BUCKET

            return [full + BUCKET] * cfg.layer + [full] * (layers - cfg.layer)
        return [full] * layers
    kept = forced_keep.numel() if forced_keep is not None else keep_count(cfg.ratio, layout.num_visual)
    short = layout.seq_len - layout.num_visual + kept
    return [layout.seq_len + new_tokens] * cfg.layer + [short + new_tokens] * (layers - cfg.layer)


@torch.inference_mode()
def prefill(loaded: Loaded, encoded, cfg: PruneConfig, prior=None, forced_keep=None, new_tokens: int = 1, *,
            prefix: Prefix | None = None, keep_prefix=None, cache=None) -> Prefill:
    """The text model over the whole prompt (pruning at layer K), into a preallocated KV cache with
    room for `new_tokens` more; returns the last position's logits.

    prefix: the cached start of this prompt (same video, another question): its rows are copied in
    and layers 0..n-1 run on the question's rows only. keep_prefix: the prompt's ids up to the
    video's end, to return that start as Prefill.prefix for the next question. cache: an empty
    kv.StaticKV with room for cache_lengths (one slot of the batched cache, kv_slots.py) to fill
    instead of one from the model's pool. cfg: resolved for this model (loaded.resolve_prune)."""
    require_resolved(cfg, "engine.prefill")
    text = loaded.adapter.text_model(loaded.model)
    dims = loaded.dims
    if cache is None:
        cache = loaded.kv_pool.acquire(cache_lengths(loaded, encoded, cfg, max(1, new_tokens), forced_keep),
                                       dims["kv_heads"], dims["head_dim"], encoded.inputs_embeds.dtype, loaded.device)
    start = 0 if prefix is None else prefix.length
    for layer, (keys, values) in zip(cache.layers, prefix.kv if prefix is not None else []):
        layer.update(keys, values)
    select_watch = measure.Stopwatch(loaded.device)
    session = None
    if cfg.prunes:
        session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, prior=prior, forced_keep=forced_keep,
                               timer=select_watch, graphs=loaded.graphs, prefix=prefix,
                               keep_prefix=0 if keep_prefix is None else keep_prefix.numel())
    # Every extra kwarg concerns visual positions (DeepStack), and the question's rows hold none.
    extra = encoded.extra if prefix is None else {}
    watch = measure.Stopwatch(loaded.device)
    with watch, (session or nullcontext()):
        out = text(inputs_embeds=encoded.inputs_embeds[:, start:], position_ids=encoded.position_ids[..., start:],
                   use_cache=True, **cache_kwargs(text, cache), **extra)
        logits = loaded.adapter.lm_head(loaded.model)(out.last_hidden_state[:, -1:])
    kept = session.kept if session else None
    kept_len = session.keep_positions.numel() if session else encoded.layout.seq_len
    unpruned = loaded.num_layers * encoded.layout.seq_len * cache.bytes_per_row()
    state = Prefill(cache, logits, watch.seconds, select_watch.seconds, kept, kept_len, cache.bytes_used(), unpruned,
                    session)
    if keep_prefix is not None and prefix is None:
        state.prefix = _kept_prefix(cache, keep_prefix, session, cfg.layer if cfg.prunes else loaded.num_layers)
    return state


def _kept_prefix(cache, ids, session, layers: int) -> Prefix:
    n = ids.numel()
    kv = [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in cache.layers[:layers]]
    hidden = cos = sin = None
    if session is not None:
        hidden, cos, sin = session.prefix_hidden
    return Prefix(ids.reshape(-1).clone(), kv, hidden, cos, sin)

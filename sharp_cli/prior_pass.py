"""The positional prior pass: layer-K attention of an all-black clip with the same layout and prompt
shape, per head (H, N), computed once per layout and kept in a PriorStore (prune/prior.py) for
later questions.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import torch

from sharp_cli import measure
from sharp_cli.engine import encode, prepare
from sharp_cli.errors import ModelError
from sharp_cli.loading import Loaded
from sharp_cli.prune.config import PruneConfig, require_resolved
from sharp_cli.prune.prior import PriorStore, digest, files_fingerprint, weights_fingerprint
from sharp_cli.prune.session import PruneSession, StopPrefill
from sharp_cli.prune.sharp import prior_from

PRIOR_QUESTION = "What happens in this video?"  # fixed prompt of the positional-prior pass


@dataclass
class PriorInfo:
    prior: torch.Tensor | None = None
    cached: bool = False
    seconds: float = 0.0


def positional_prior(loaded: Loaded, clip, encoded, cfg: PruneConfig, store: PriorStore,
                     max_pixels: int | None = None) -> PriorInfo:
    """Layer-K attention (H, N) of an all-black clip with the same frames and size, per head
    (prune/sharp.py prior_from), cached per layout. cfg: resolved (loaded.resolve_prune)."""
    require_resolved(cfg, "prior_pass.positional_prior")
    if not cfg.uses_prior:
        return PriorInfo()
    layout = encoded.layout
    key = store.key(prior_key(loaded, encoded, cfg))
    prior = store.get(key)
    if prior is not None:
        return PriorInfo(prior.to(loaded.device), True, 0.0)
    black = black_clip(clip)
    watch = measure.Stopwatch(loaded.device)
    with watch:
        inputs = prepare(loaded, black, PRIOR_QUESTION, max_pixels)
        black_encoded, _ = encode(loaded, inputs)
        if black_encoded.layout.grid != layout.grid:
            raise ModelError("the black-video prior pass produced a different token layout")
        scores = _scores_only(loaded, black_encoded, cfg)
    store.put(key, scores, {"model": loaded.name, "grid": layout.describe(), "layer": cfg.layer})
    return PriorInfo(scores, False, watch.seconds)


def prior_key(loaded: Loaded, encoded, cfg: PruneConfig) -> dict:
    """Everything the prior depends on. The model by its files and weights (not the name typed);
    the prompt by the prior question's tokens (chat template and tokenizer included) and by the
    positions of everything up to the video's end (the text before it, the token grid and the
    clip's timing, which Qwen's temporal positions and Qwen3-VL's timestamps follow); then the
    pruning settings that shape layers 0..K, and sharp's version."""
    from sharp_cli import __version__

    model = _model_identity(loaded)
    layout = encoded.layout
    upto = encoded.position_ids[..., :layout.visual_end]
    return dict(model, dtype=str(loaded.dtype), quant=loaded.quant, grid=layout.grid,
                frames_per_step=layout.frames_per_step, text_before_video=int(layout.indices[0]),
                positions=digest(upto.detach().to("cpu", torch.int64).numpy().tobytes()),
                layer=cfg.layer, query=cfg.query, segment_mask=cfg.segment_mask,
                segment_frames=cfg.segment_frames or layout.frames_per_step, sharp=__version__)


def _model_identity(loaded: Loaded) -> dict:
    """Hashes of the model and its prompt machinery, made once per loaded model."""
    cached = loaded.prior_identity
    if cached is None:
        processor = loaded.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        prompt = loaded.adapter.prompt(processor, PRIOR_QUESTION)
        ids = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
        video = getattr(processor, "video_processor", None)
        cached = {
            "class": type(loaded.model).__name__, "random_weights": loaded.random_weights,
            "files": files_fingerprint(loaded.folder), "weights": weights_fingerprint(loaded.model),
            "template": digest(getattr(processor, "chat_template", None) or ""),
            "prior_prompt": digest(json.dumps(ids)), "prior_prompt_tokens": len(ids), "vocab": len(tokenizer),
            "video_processor": digest(video.to_json_string() if video is not None else ""),
        }
        loaded.prior_identity = cached
    return cached


@torch.inference_mode()
def score_pass(loaded: Loaded, encoded, cfg: PruneConfig) -> PruneSession:
    """Layers 0..K of `encoded` and no further: the session holds layer K's log attention
    (H, R, N) from cfg's query rows (cfg's mask in layers 0..K-1) and layer K's input at the
    visual tokens (N, D). The prior pass below, and research probes, read it."""
    text = loaded.adapter.text_model(loaded.model)
    session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, score_only=True)
    try:
        with session:
            text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False,
                 **encoded.extra)
    except StopPrefill:
        pass
    return session


def _scores_only(loaded: Loaded, encoded, cfg: PruneConfig) -> torch.Tensor:
    """The prior (H, N) of `encoded`: layer K's log attention from the query rows, rows averaged
    in log space, one distribution over the visual tokens per head."""
    return prior_from(score_pass(loaded, encoded, cfg).log_attention)


def black_clip(clip):
    black = copy.copy(clip)
    black.frames = np.zeros_like(clip.frames)
    return black

"""Does a model's shallow attention look like a real video LLM's? The statistics that decide whether
a model may judge a shallow-layer pruning method (docs/eval.md, "Acceptance checks").

For each question, the last prompt token's attention at a few decoder layers (per head, over the
whole sequence; computed for that one query row only, never L x L) gives:

  entropy   normalised entropy of each head's attention over the visual tokens (renormalised to
            them), mean over heads: 1 = uniform, 0 = one token. Real shallow layers spread out.
  zeros     share of (head, visual token) pairs whose attention is exactly 0.0 in float32.
  top1      the largest single visual token's share of a head's visual attention, mean over heads.
  recency   of the head-averaged visual attention, the share of the top-10% tokens' mass that sits
            in the last eighth of the token frames (real models: most of it; AdaTP, field notes 1).
  sink      the head-averaged share of all attention taken by the text before the video (system
            prompt, BOS, chat header): where real models park attention from layer 2 on.
  frames    the head-averaged visual attention summed per token frame (T,), for the prior's shape.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

CAPTURE_NAME = "sharp_last_row_capture"

# The checks of issue 24 (thresholds as written there; a check that fails is reported, never relaxed).
THRESHOLDS = {"entropy": 0.6, "zeros": 0.01, "top1": 0.2, "recency": 0.5, "sink": 0.5}


class LastRowCapture:
    """An attention function (transformers' AttentionInterface) that keeps, for the chosen layers,
    the softmax of the last query row over every key, (B, H, L) float32, then hands the call to the
    attention function that was set before, so the layer's output is unchanged."""

    def __init__(self, layers, inner: str):
        self.layers, self.inner, self.probs, self.visible = set(layers), inner, {}, None

    def __call__(self, module, query, key, value, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        layer = getattr(module, "layer_idx", None)
        if layer in self.layers and query.shape[2] > 1:
            with torch.no_grad():
                q = query[:, :, -1].float()  # (B, H, d)
                k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, L, d)
                scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
                logits = torch.einsum("bhd,bhld->bhl", q, k) * scale
                if self.visible is not None:  # left padding: the last row sees only real tokens
                    logits = logits.masked_fill(~self.visible[:, None, : logits.shape[-1]], float("-inf"))
                self.probs[layer] = logits.softmax(-1)
        return ALL_ATTENTION_FUNCTIONS[self.inner](module, query, key, value, attention_mask, **kwargs)


@contextmanager
def capture(text_config, layers):
    """Within the block, the text model's attention also records the last row at `layers`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = text_config._attn_implementation
    # "eager" is each module's own code, not a registered function: the capture hands on to SDPA then
    recorder = LastRowCapture(layers, inner if inner in ALL_ATTENTION_FUNCTIONS else "sdpa")
    AttentionInterface.register(CAPTURE_NAME, recorder)
    mask = ALL_MASK_ATTENTION_FUNCTIONS[recorder.inner] if recorder.inner in ALL_MASK_ATTENTION_FUNCTIONS \
        else ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    AttentionMaskInterface.register(CAPTURE_NAME, mask)
    text_config._attn_implementation = CAPTURE_NAME
    try:
        yield recorder
    finally:
        text_config._attn_implementation = inner


def row_stats(probs: torch.Tensor, visual: torch.Tensor, frames: int, sink: torch.Tensor) -> dict:
    """The statistics above for one sequence. probs (H, L): the last row's attention per head;
    visual (N,): sequence positions of the visual tokens in (token frame, row, column) order;
    frames: token frames T (N = T x tokens per frame); sink (S,): positions of the text before the video."""
    probs = probs.float()
    v = probs[:, visual]  # (H, N)
    n = v.shape[1]
    share = v / v.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / math.log(n)
    mean = share.mean(0)  # (N,) head-averaged visual attention
    top = mean.topk(max(1, n // 10)).indices
    last = top >= (frames - max(1, frames // 8)) * (n // frames)  # token frames are contiguous in N
    per_frame = mean.view(frames, -1).sum(-1) if n % frames == 0 else mean.new_zeros(frames)
    return {
        "entropy": float(entropy.mean()), "zeros": float((v == 0).float().mean()),
        "top1": float(share.max(-1).values.mean()),
        "recency": float(mean[top][last].sum() / mean[top].sum().clamp_min(1e-30)),
        "sink": float(probs[:, sink].sum(-1).mean()) if sink.numel() else 0.0,
        "visual": float(v.sum(-1).mean()), "frames": per_frame.tolist(),
    }


def mean_stats(rows: list[dict]) -> dict:
    """Mean of row_stats over questions; `frames` averaged element-wise."""
    if not rows:
        return {}
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "frames"}
    out["frames"] = [sum(col) / len(rows) for col in zip(*(r["frames"] for r in rows))]
    return out


def profile_shape(frames: list[float]) -> dict:
    """Is a per-token-frame attention profile end-heavy or monotone? Spearman's rank correlation of
    mass against frame index, and the last eighth's share (uniform: 1/8)."""
    t = len(frames)
    if t < 2:
        return {"spearman": 0.0, "last_eighth": 1.0}
    ranks = torch.tensor(frames).argsort().argsort().float()
    idx = torch.arange(t, dtype=torch.float32)
    rho = float(torch.corrcoef(torch.stack([ranks, idx]))[0, 1])
    total = sum(frames) or 1.0
    return {"spearman": rho, "last_eighth": sum(frames[t - max(1, t // 8):]) / total}

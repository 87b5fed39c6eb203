"""Segment-aware causal attention for layers 0..K-1, with O(N) extra memory.

Visual tokens of one segment see each other in both directions; everything else stays causal.
Every query row of a segment may see all keys up to the segment's end, so the attention splits
into row blocks that plain SDPA computes without a mask: a 'full' block for each segment and
'causal' blocks for the text between them. No L x L mask is ever built; only the short text
blocks after the first one take a small (rows x keys) mask.

It is registered with transformers' AttentionInterface as "sharp_sdpa" and falls through to the
stock SDPA function whenever no segment plan is active (decoding, layers >= K, other models).
No mask function is registered for it, so transformers builds no mask: sharp runs batch 1
without padding, where causal SDPA needs none.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

ATTN_NAME = "sharp_sdpa"


@dataclass(frozen=True)
class SegmentPlan:
    layers: int  # applies to decoder layers with index < layers
    seq_len: int
    blocks: tuple[tuple[str, int, int], ...]  # ("full" | "causal", first row, end row)


_ACTIVE: ContextVar[SegmentPlan | None] = ContextVar("sharp_segment_plan", default=None)


def row_blocks(seq_len: int, segments: list[tuple[int, int]]) -> tuple[tuple[str, int, int], ...]:
    blocks, cursor = [], 0
    for start, end in segments:
        if start > cursor:
            blocks.append(("causal", cursor, start))
        blocks.append(("full", start, end))
        cursor = end
    if cursor < seq_len:
        blocks.append(("causal", cursor, seq_len))
    return tuple(blocks)


@contextmanager
def segment_plan(plan: SegmentPlan | None):
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def segment_causal_attention(query, key, value, blocks, scaling=None):
    """query (B, H, L, d), key/value (B, Hkv, L, d) -> (B, L, H, d), like transformers' SDPA path."""
    import torch
    import torch.nn.functional as F

    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    for kind, first, end in blocks:
        q, k, v = query[:, :, first:end], key[:, :, :end], value[:, :, :end]
        if kind == "full":
            o = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        elif first == 0:
            o = F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=True, enable_gqa=gqa)
        else:  # causal rows that start after other rows: bottom-right aligned, small mask
            rows = torch.arange(first, end, device=q.device).unsqueeze(1)
            mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[:, :, first:end] = o
    return out.transpose(1, 2).contiguous()


def sharp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plan = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if (
        plan is None
        or layer is None
        or layer >= plan.layers
        or query.shape[0] != 1
        or query.shape[2] != plan.seq_len
        or key.shape[2] != plan.seq_len
    ):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return segment_causal_attention(query, key, value, plan.blocks, scaling), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sharp_attention)
    return ATTN_NAME


def dense_segment_mask(seq_len: int, segments: list[tuple[int, int]]):
    """Reference mask for tests only (L x L): causal plus bidirectional inside each segment."""
    import torch

    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    for start, end in segments:
        allowed[start:end, start:end] = True
    return allowed

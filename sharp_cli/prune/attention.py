"""Segment-aware causal attention for layers 0..K-1, with O(N) extra memory.

Visual tokens of one segment see each other in both directions; everything else stays causal.
No L x L mask is ever built. Two exact ways to compute it (PruneConfig.segment_attention):

- blocks (the default): every row of a segment may see all keys up to the segment's end, so the
  attention splits into row blocks that plain SDPA computes without a mask. One launch per
  segment: at 16-32 segments of a few hundred rows each, those fill a Hopper GPU poorly.
- merged: one causal flash-attention call over the whole sequence, plus, batched over the
  segments, attention of each segment's rows over the segment's own keys (all of them, and the
  causal half). Row i of a segment [a, b) must see keys [0, b) = [0, i] + [a, b) - [a, i]; flash
  kernels return each row's log-sum-exp, so the three parts merge exactly. Three launches per
  layer, but on an H200 the flash op with log-sum-exp, the grouped-query head copies and the fp32
  merge cost more than the launches saved (research/segment_attention_check.py: 2.73 vs 1.25 ms a
  layer at 16 segments of 392 tokens, 2.62 vs 2.57 at 32 of 196). Kept as the exact building
  block for a fused kernel, and for GPUs where the balance differs.

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
    runs: tuple[tuple[int, int], ...] = ()  # the segments' ranges [start, end); set: use the merged way


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


def _flash_with_lse(q, k, v, causal: bool, scale):
    """(out (B, H, L, d), log-sum-exp (B, H, L) in fp32) from the flash kernel, which computes
    the log-sum-exp anyway; the public SDPA function does not return it."""
    import torch

    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out[0], out[1]


def merged_segment_attention(query, key, value, runs, scaling=None):
    """Same contract as segment_causal_attention, in three launches per run length (module doc)."""
    import torch

    heads = query.shape[1]
    if key.shape[1] != heads:  # the flash op takes no grouped-query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    out, lse = _flash_with_lse(query, key, value, True, scaling)  # every row over keys <= itself
    rows_major = out[0].transpose(0, 1)  # (L, H, d) view of the output, written in place below
    by_length: dict[int, list[int]] = {}
    for start, end in runs:
        by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        rows = (torch.tensor(starts, device=query.device)[:, None]
                + torch.arange(length, device=query.device)).flatten()

        def per_segment(x):  # (1, H, L[, d]) -> (segments, H, length[, d])
            return x[0].transpose(0, 1).index_select(0, rows).unflatten(0, (len(starts), length)).transpose(1, 2)

        q, k, v = per_segment(query), per_segment(key), per_segment(value)
        full, lse_full = _flash_with_lse(q, k, v, False, scaling)  # the segment's rows over all its keys
        tri, lse_tri = _flash_with_lse(q, k, v, True, scaling)  # the part `out` already holds
        causal, lse_causal = per_segment(out), per_segment(lse)
        top = torch.maximum(lse_causal, lse_full)
        w_causal, w_full, w_tri = ((x - top).exp().unsqueeze(-1) for x in (lse_causal, lse_full, lse_tri))
        # [0, i] + [a, b) - [a, i]: both weights on the left are >= w_tri, so the denominator is at
        # least half their sum and the subtraction loses no precision worth a bf16 output.
        merged = (w_causal * causal.float() + w_full * full.float() - w_tri * tri.float()) / (w_causal + w_full - w_tri)
        rows_major.index_copy_(0, rows, merged.transpose(1, 2).flatten(0, 1).to(out.dtype))
    return out.transpose(1, 2).contiguous()


def decode_attention(query, key, value, valid, scaling=None):
    """One query row over a preallocated KV buffer whose unwritten rows are masked by `valid`
    ((rows,), or (B, rows) when the sequences of a batch hold different rows).

    Two batched matrix products and a softmax, not SDPA: with a mask SDPA picks the memory-efficient
    kernel, which gives one thread block to each (head, query block) and walks the whole buffer in
    it, a handful of blocks for a whole GPU (3.7 ms a step over 6,272 rows of 28 layers on an H200).
    A product with one row per query head is a matrix-vector product that cuBLAS spreads over the
    keys. The query heads that share a KV head become rows of one (B, Hkv, G, d) query, so
    grouped-query attention needs no repeated K/V copies. Fixed shapes, so the call can sit in a
    CUDA graph; the softmax runs in float32. Returns (B, 1, H, d) like transformers' SDPA path."""
    import torch

    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim) * scale
    scores = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, G, rows): one score per key, no L x L
    if valid.dim() == 2:  # (B, rows): each sequence of a batched step its own rows (kv_slots.py)
        valid = valid[:, None, None, :]
    scores = torch.where(valid, scores.float(), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2)


def continued_causal_attention(query, key, value, scaling=None):
    """Causal attention of the last q rows over k >= q keys (rows continue a cached prefix). SDPA's
    is_causal aligns the triangle top-left, which would hide most of the prefix."""
    import torch
    import torch.nn.functional as F

    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(k_len - q_len, k_len, device=query.device).unsqueeze(1)
    mask = torch.arange(k_len, device=query.device).unsqueeze(0) <= rows
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def sharp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sharp_cli.kv import VALID_KWARG

    layer = getattr(module, "layer_idx", None)
    valid = kwargs.get(VALID_KWARG)
    if valid is not None and layer is not None and query.shape[2] == 1:  # a decode step (decode.py)
        return decode_attention(query, key, value, valid[layer], scaling), None
    if attention_mask is None and layer is not None and 1 < query.shape[2] < key.shape[2]:
        return continued_causal_attention(query, key, value, scaling), None
    plan = _ACTIVE.get()
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
    if plan.runs and flash_available(query):
        return merged_segment_attention(query, key, value, plan.runs, scaling), None
    return segment_causal_attention(query, key, value, plan.blocks, scaling), None


def flash_available(query) -> bool:
    """Whether the flash kernels the merged way calls take these inputs. Asked up front, so that
    nothing is caught later: an out-of-memory error in the merged way must reach the user."""
    import torch

    if query.device.type == "cpu":
        return True  # the CPU flash kernel takes every floating dtype and head size
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    major, _ = torch.cuda.get_device_capability(query.device)
    head = query.shape[-1]
    return major >= 8 and head % 8 == 0 and head <= 256


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

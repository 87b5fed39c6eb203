"""Packed (varlen) attention for Qwen vision towers, batched with SDPA.

Qwen2/2.5/3-VL vision blocks attend inside windows or frames of a packed sequence, described by
cu_seqlens. Without flash-attn, transformers splits the sequence and calls SDPA once per window:
thousands of tiny calls per video (about 0.75 s of a 0.92 s time-to-first-token for 32 frames of
Qwen2.5-VL-7B on an H100, docs/benchmarks.md). Nearly all windows share a few lengths, so this
function gathers the chunks of each length into one batch and makes one SDPA call per length.

transformers hands cu_seqlens only to attention functions whose name contains "flash"; hence the
name. The result is exact attention, the same as the per-chunk loop.
"""

from __future__ import annotations

NAME = "sharp_flash_varlen_sdpa"


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """query/key/value (1, H, T, d) packed along T; returns (1, T, H, d) like transformers' SDPA."""
    import torch
    import torch.nn.functional as F

    if cu_seq_lens_q is None or query.shape[0] != 1 or (cu_seq_lens_k is not None
                                                       and not torch.equal(cu_seq_lens_q, cu_seq_lens_k)):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, is_causal=is_causal, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    out = torch.empty_like(query)
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        if length:
            by_length.setdefault(length, []).append(start)
    for length, group in by_length.items():
        rows = (torch.tensor(group, device=query.device).unsqueeze(1)
                + torch.arange(length, device=query.device)).reshape(-1)
        gather = lambda t: t[0][:, rows].unflatten(1, (len(group), length)).transpose(0, 1)  # noqa: E731
        o = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), scale=scaling,
                                           is_causal=is_causal)
        out[0][:, rows] = o.transpose(0, 1).flatten(1, 2)
    return out.transpose(1, 2).contiguous(), None


def vision_tower(model):
    """A Qwen model's packed vision tower (`model.model.visual`), or None for other families."""
    return getattr(getattr(model, "model", None), "visual", None)


def register() -> str:
    import torch
    from transformers import AttentionInterface

    # Under --compile (compiled.py) the blocks around it are compiled, not this: its Python loop over
    # window lengths would make dynamo guard on every video's window layout and recompile for each.
    AttentionInterface.register(NAME, torch.compiler.disable(packed_attention))
    return NAME

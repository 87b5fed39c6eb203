"""Packed (varlen) attention for Qwen vision towers, batched with SDPA.

Qwen2/2.5/3-VL vision blocks attend inside windows or frames of a packed sequence, described by
cu_seqlens. Without flash-attn, transformers splits the sequence and calls SDPA once per window:
thousands of tiny calls per video (about 0.75 s of a 0.92 s time-to-first-token for 32 frames of
Qwen2.5-VL-7B on an H100, docs/benchmarks.md). Nearly all windows share a few lengths, so this
function gathers the chunks of each length into one batch and makes one SDPA call per length.
Where every chunk has one length and they tile the sequence in order (Qwen2-VL's and Qwen3-VL's
frames, Qwen2.5-VL's full-attention blocks) the batch is a reshape of the sequence, with no gather.

The grouping needs cu_seqlens on the host (a device sync). A tower hands the same cu_seqlens tensor
to every block, so it is read once per tensor (`window_plan`), not once per block, and the plan is
kept on the tensor itself: it lives exactly as long as the layout it describes. A caller that
computes a plan before a CUDA graph capture (vision_graphs.py) leaves the captured blocks nothing to
read back.

transformers hands cu_seqlens only to attention functions whose name contains "flash"; hence the
name. The result is exact attention, the same as the per-chunk loop.

On CUDA in bf16/fp16, where this torch has `torch.nn.attention.varlen`, a block is one varlen flash
call over the packed sequence instead (SHARP_VISION_VARLEN=0 turns it off): no gather of the chunks
and no copy back. Those gathers and copies took 7.0 ms of a 32-frame Qwen2.5-VL-7B tower on an H100;
research/vision_check.py's varlen row matches the grouped path's features and is faster on an H100
(docs/benchmarks.md). The CPU tests check what it is handed, with a reference in its place.
"""

from __future__ import annotations

import math
import os

NAME = "sharp_flash_varlen_sdpa"
_PLAN = "_sharp_window_plan"  # the attribute of a cu_seqlens tensor that holds its plan
_BOUNDS = "_sharp_varlen_bounds"  # and the one that holds its varlen bounds
VARLEN_SWITCH = "SHARP_VISION_VARLEN"  # =0: the grouped SDPA calls instead of one varlen flash call a block
VARLEN_DEFAULT = "1"


def varlen_kernel(query):
    """torch's varlen_attn for `query` (1, H, T, d), or None: switched off, not CUDA bf16/fp16, inside
    torch.compile (`--compile`'s vision blocks keep the grouped path they were measured with), or a
    torch without it (added in torch 2.9)."""
    import torch

    if os.environ.get(VARLEN_SWITCH, VARLEN_DEFAULT) != "1" or not query.is_cuda \
            or query.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_bounds(cu_seqlens, device):
    """(bounds, longest, (first, last)): cu_seqlens without its empty chunks, int32 on `device` (what
    flash's varlen kernel takes), the longest chunk, and the span the chunks cover. One host read per
    tensor, cached on it like window_plan."""
    import torch

    found = getattr(cu_seqlens, _BOUNDS, None)
    if found is None:
        bounds = cu_seqlens.tolist()
        kept = bounds[:1] + [b for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        longest = max((b - a for a, b in zip(kept[:-1], kept[1:])), default=0)
        found = (torch.tensor(kept, dtype=torch.int32, device=device), longest, (kept[0], kept[-1]))
        setattr(cu_seqlens, _BOUNDS, found)
    return found


def window_plan(cu_seqlens, device):
    """[(length, count, rows)] of cu_seqlens (num_chunks + 1,): the chunks grouped by length, rows
    the (count * length,) sequence positions of a group's chunks on `device`, or None where the one
    group is the whole sequence in order. Computed once per tensor (one host read) and cached on it."""
    import torch

    plan = getattr(cu_seqlens, _PLAN, None)
    if plan is not None:
        return plan
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    if len(by_length) == 1 and bounds[0] == 0:  # one length; zero-length chunks dropped, so they tile
        (length, starts), = by_length.items()  # [0, bounds[-1]) in order: a reshape
        plan = [(length, len(starts), None)]
    else:
        plan = [(length, len(starts), (torch.tensor(starts, device=device).unsqueeze(1)
                                        + torch.arange(length, device=device)).reshape(-1))
                for length, starts in by_length.items()]
    setattr(cu_seqlens, _PLAN, plan)
    return plan


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """query/key/value (1, H, T, d) packed along T; returns (1, T, H, d) like transformers' SDPA."""
    import torch
    import torch.nn.functional as F

    # `is` first: the towers pass one tensor as both, and torch.equal would be a device sync.
    if cu_seq_lens_q is None or query.shape[0] != 1 or (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
                                                       and not torch.equal(cu_seq_lens_q, cu_seq_lens_k)):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, is_causal=is_causal, **kwargs)
    _, heads, total, dim = query.shape
    varlen = varlen_kernel(query)
    if varlen is not None and not is_causal and (scaling is None or math.isclose(scaling, dim ** -0.5, rel_tol=1e-6)):
        bounds, longest, covered = varlen_bounds(cu_seq_lens_q, query.device)
        if covered == (0, total):  # the chunks tile the whole sequence, as the towers' do
            out = varlen(_token_rows(query), _token_rows(key), _token_rows(value), bounds, bounds, longest,
                         longest)  # (T, H, d)
            return out.unsqueeze(0), None
    plan = window_plan(cu_seq_lens_q, query.device)
    if plan[0][2] is None and plan[0][0] * plan[0][1] == total:  # (1, H, T, d) -> (count, H, length, d)
        length, count, _ = plan[0]
        split = lambda t: t[0].unflatten(1, (count, length)).transpose(0, 1)  # noqa: E731
        o = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scaling,
                                           is_causal=is_causal)
        return o.transpose(1, 2).reshape(1, total, heads, dim), None
    # Gathered and scattered as whole token rows (T, H, d), the layout the towers hand over (a
    # transposed view) and take back: one H * d row a token instead of H pieces of d, and no copy of
    # the output into (1, T, H, d) at the end. Index kernels took 15.2 ms of a 32-frame tower's
    # kernel time on an H200 with the piecewise gather (research/results/h200-decode-profiles-compile.log).
    out = query.new_empty(total, heads, dim)
    for length, count, rows in plan:
        if rows is None:  # one length, but not covering this sequence: gather it like the others
            rows = torch.arange(length * count, device=query.device)
        gather = lambda t: _token_rows(t).index_select(0, rows).view(count, length, heads, dim).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), scale=scaling,
                                           is_causal=is_causal)  # (count, H, length, d)
        out.index_copy_(0, rows, o.transpose(1, 2).reshape(count * length, heads, dim))
    return out.unsqueeze(0), None


def _token_rows(t):
    """(1, H, T, d) -> (T, H, d), a view: the towers' layout, one H * d row a token."""
    return t[0].transpose(0, 1)


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

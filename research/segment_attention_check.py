"""Segment-aware attention on the GPU at real size: the merged way and the per-block way against a
dense-mask reference, and their times (CUDA events, median of 20 after 5 warm-up).

Usage: python -m research.segment_attention_check [--tokens 6272] [--segment 392] [--heads 28 --kv-heads 4]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sharp_cli.prune import attention as seg


def timed(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=6272)
    p.add_argument("--segment", type=int, default=392)
    p.add_argument("--prefix", type=int, default=15)
    p.add_argument("--suffix", type=int, default=13)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    length = a.prefix + a.tokens + a.suffix
    runs = [(a.prefix + s, a.prefix + s + a.segment) for s in range(0, a.tokens, a.segment)]
    blocks = seg.row_blocks(length, runs)
    q = torch.randn(1, a.heads, length, a.dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, a.kv_heads, length, a.dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, a.kv_heads, length, a.dim, device="cuda", dtype=torch.bfloat16)
    scale = a.dim ** -0.5
    rep = a.heads // a.kv_heads
    mask = seg.dense_segment_mask(length, runs).cuda()
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                         v.float().repeat_interleave(rep, 1), attn_mask=mask, scale=scale)
    ref = ref.transpose(1, 2)
    merged = seg.merged_segment_attention(q, k, v, runs, scale)
    blocked = seg.segment_causal_attention(q, k, v, blocks, scale)
    print(f"{length} tokens, {len(runs)} segments of {a.segment}, {a.heads}/{a.kv_heads} heads of {a.dim}, bf16, "
          f"{torch.cuda.get_device_name()}")
    for name, out in (("merged", merged), ("blocks", blocked)):
        err = (out.float() - ref).abs()
        print(f"  {name}: max abs err vs fp32 dense reference {err.max():.2e}, mean {err.mean():.2e}")
    print(f"  merged vs blocks max abs diff {(merged.float() - blocked.float()).abs().max():.2e}")
    plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)  # noqa: E731
    for name, fn in (("plain causal SDPA (no segments)", plain),
                     ("merged", lambda: seg.merged_segment_attention(q, k, v, runs, scale)),
                     ("blocks", lambda: seg.segment_causal_attention(q, k, v, blocks, scale))):
        print(f"  {name}: {timed(fn):.3f} ms per layer")


if __name__ == "__main__":
    main()

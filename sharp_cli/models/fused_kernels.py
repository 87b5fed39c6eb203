"""Triton source of the fused kernels: the decode step's (models/fused_step.py launches them and says
why) and the vision tower's rotary embedding (models/fused_vision.py).

Imported only when a kernel is first launched, so Triton stays out of `sharp --help` and of
machines without it. Each kernel rounds where transformers' eager code rounds (a product or a
normed row to the input dtype before the next operation), so on the GPU it gives the stock numbers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm(x_ptr, w_ptr, y_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n + eps)
    normed = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # stock: hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def round_to(x, dt: tl.constexpr):
    """x (float32) rounded to dt and back, to nearest even; for bf16 through the bits. A float round
    trip does not survive the GPU compiler where a product of two bf16 values meets an add: LLVM may
    shrink `fptrunc(fpext(a) * fpext(b))` to a bf16 multiply (exact: float32 holds the product) and
    then contract `fpext(that) + c` into one FMA, whose product is never rounded (kernel_bench
    --fused on an H200: 676 of 4,096 rotary values apart, as an unrounded product gives on the CPU:
    627-699). Integer operations are neither shrunk nor contracted, and the CPU interpreter, which
    truncates in `.to(bf16)`, rounds the same way through them."""
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dt).to(tl.float32)


@triton.jit
def rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, q_heads, k_heads,
           q_batch, q_head, k_batch, k_head, cs_batch, HALF_DIM: tl.constexpr, BLOCK: tl.constexpr):
    head, b = tl.program_id(0), tl.program_id(1)  # heads 0..q_heads-1 are q's, the rest k's
    if head < q_heads:
        src = q_ptr + b * q_batch + head * q_head
        dst = qo_ptr + (b * q_heads + head) * 2 * HALF_DIM
    else:
        src = k_ptr + b * k_batch + (head - q_heads) * k_head
        dst = ko_ptr + (b * k_heads + head - q_heads) * 2 * HALF_DIM
    cols = tl.arange(0, BLOCK)
    ok = cols < HALF_DIM
    c1 = tl.load(cos_ptr + b * cs_batch + cols, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * cs_batch + HALF_DIM + cols, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * cs_batch + cols, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * cs_batch + HALF_DIM + cols, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF_DIM + cols, mask=ok, other=0.0).to(tl.float32)
    # stock: x * cos + cat(-x2, x1) * sin, each product rounded to the dtype, then their sum
    dt: tl.constexpr = qo_ptr.dtype.element_ty
    lo = round_to(round_to(x1 * c1, dt) - round_to(x2 * s1, dt), dt)
    hi = round_to(round_to(x2 * c2, dt) + round_to(x1 * s2, dt), dt)
    tl.store(dst + cols, lo.to(dt), mask=ok)
    tl.store(dst + HALF_DIM + cols, hi.to(dt), mask=ok)


@triton.jit
def silu_mul(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_rows(src, dst, row_stride, head_stride, heads, row, c1, c2, s1, s2, HALF_DIM: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    """One row's heads of q or k (heads, 2 * HALF_DIM) rotated in float32 into dst (contiguous)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    ok = (h < heads) & (cols < HALF_DIM)
    at = src + row * row_stride + h * head_stride + cols
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF_DIM, mask=ok, other=0.0).to(tl.float32)
    # stock (apply_rotary_pos_emb_vision): q.float() * cos + cat(-x2, x1) * sin, rounded to the dtype once;
    # launched with FMA contraction off, so each product rounds to float32 as eager's kernels do
    dt: tl.constexpr = dst.dtype.element_ty
    out = dst + (row * heads + h) * 2 * HALF_DIM + cols
    tl.store(out, round_to(x1 * c1 - x2 * s1, dt).to(dt), mask=ok)
    tl.store(out + HALF_DIM, round_to(x2 * c2 + x1 * s2, dt).to(dt), mask=ok)


@triton.jit
def vision_rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, heads, q_row, q_head, k_row, k_head, cos_row,
                  sin_row, HALF_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    """A vision tower's rotary embedding of one row (patch): q and k (rows, heads, 2 * HALF_DIM) at
    any row and head strides (views of the qkv product), cos and sin (rows, 2 * HALF_DIM)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    ok = cols < HALF_DIM
    c1 = tl.load(cos_ptr + row * cos_row + cols, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row * cos_row + HALF_DIM + cols, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row * sin_row + cols, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row * sin_row + HALF_DIM + cols, mask=ok, other=0.0).to(tl.float32)
    _rotate_rows(q_ptr, qo_ptr, q_row, q_head, heads, row, c1, c2, s1, s2, HALF_DIM, BLOCK_H, BLOCK)
    _rotate_rows(k_ptr, ko_ptr, k_row, k_head, heads, row, c1, c2, s1, s2, HALF_DIM, BLOCK_H, BLOCK)

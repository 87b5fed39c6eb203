"""Triton source of the 4-bit matrix-vector kernels (models/gemv_nf4.py launches them and says why).

Imported only when a kernel is first launched, so Triton stays out of `sharp --help` and of
machines without it.

`gemv_4bit` (k a multiple of the block size, every real checkpoint): one program owns BLOCK_N rows
and walks them NB quantization blocks at a time. A step's tile is the packed weight as int32 words
(BLOCK_N, NB * QBLOCK/8), 8 nibbles a word; word w of block b holds elements 8w..8w+7 of the
block, element 8w+t at bit 4(t^1) (bitsandbytes puts an even element in the high nibble of its
byte, and a little-endian word holds bytes 0..3 from its low end). The next step's words are loaded
before this step's are used, so two tiles' reads are in flight per thread. Each nibble becomes its
float32 code through a warp shuffle on the GPU (lane L holds code[L % 16] in a scalar; shfl reads the lane
named by the index's low five bits, so the nibble above needs no masking): one shift and one
shuffle a weight, no address arithmetic. Without SHUFFLE (Triton's CPU interpreter, which runs no
inline assembly) the code is loaded from the 16-entry table instead. The 8 codes of a word meet
the 8 x values of its columns in a chain of fused multiply-adds; the words of a block are summed,
scaled by the block's absmax (decoded from the uint8 double quantization when NESTED) and added
to a float32 accumulator (BLOCK_N, NB), reduced once at the end.

Rows past n are clamped to the last row (read, computed, never stored), so the loop over whole
tiles needs no masks; blocks past a multiple of NB are a last, masked step.

`gemv_4bit_any`: the same product for any shape (blocks straddling rows, odd k), element by
element from the flat index; slow, for shapes no checkpoint has.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lane_code(code_ptr, anything):
    """code[lane % 16] as a scalar: each thread's own register. A scalar has no layout, so no layout
    conversion can move it to another thread's register; a table shaped like the tile did move:
    Triton 3.6 loaded it in one layout and converted it to the shuffle's, so each thread held another
    lane's code and the shuffles read wrong codes (1.3-3.1 relative error on the GPU, while the
    interpreter, which loads instead of shuffling, was exact). `anything`: a scalar the asm ignores."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [anything], dtype=tl.int32, is_pure=True,
                                     pack=1)
    return tl.load(code_ptr + (lane & 15))


@triton.jit
def _code(words, SHIFT: tl.constexpr, code_ptr, table, SHUFFLE: tl.constexpr):
    """The float32 code of the nibble at bit SHIFT of each word."""
    if SHUFFLE:
        return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $2, $1, 0x1f, -1;", "=r,r,r",
                                         [words >> SHIFT, table], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(code_ptr + ((words >> SHIFT) & 15))


@triton.jit
def _step(acc, words, x_ptrs, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, table, index,
          words_ok, blocks_ok, NB: tl.constexpr, WORDS: tl.constexpr, NESTED: tl.constexpr,
          BLOCKS2: tl.constexpr, SHUFFLE: tl.constexpr, MASKED: tl.constexpr):
    """acc (BLOCK_N, NB) += absmax * (codes . x) for one tile: `words` (BLOCK_N, NB * WORDS) int32,
    x_ptrs (NB * WORDS, 8) its columns, index (BLOCK_N, NB) its blocks. When MASKED, words_ok
    (NB * WORDS,) and blocks_ok (NB,) mark what exists (missing words were loaded as 0)."""
    if MASKED:
        x = tl.load(x_ptrs, mask=words_ok[:, None], other=0.0)
    else:
        x = tl.load(x_ptrs)
    x = x.to(tl.float32)  # element t of word w is column 8w + t
    xc0, xc1 = tl.split(tl.reshape(x, (NB * WORDS, 2, 2, 2)))  # t = 4a + 2b + c
    xb0c0, xb1c0 = tl.split(xc0)
    xb0c1, xb1c1 = tl.split(xc1)
    x0, x4 = tl.split(xb0c0)
    x2, x6 = tl.split(xb1c0)
    x1, x5 = tl.split(xb0c1)
    x3, x7 = tl.split(xb1c1)
    s = _code(words, 4, code_ptr, table, SHUFFLE) * x0[None]  # element t at bit 4 (t ^ 1)
    s = tl.fma(_code(words, 0, code_ptr, table, SHUFFLE), x1[None], s)
    s = tl.fma(_code(words, 12, code_ptr, table, SHUFFLE), x2[None], s)
    s = tl.fma(_code(words, 8, code_ptr, table, SHUFFLE), x3[None], s)
    s = tl.fma(_code(words, 20, code_ptr, table, SHUFFLE), x4[None], s)
    s = tl.fma(_code(words, 16, code_ptr, table, SHUFFLE), x5[None], s)
    s = tl.fma(_code(words, 28, code_ptr, table, SHUFFLE), x6[None], s)
    s = tl.fma(_code(words, 24, code_ptr, table, SHUFFLE), x7[None], s)
    sums = tl.sum(tl.reshape(s, (s.shape[0], NB, WORDS)), axis=2)  # (BLOCK_N, NB) block sums
    if MASKED:
        if NESTED:  # absmax = code2[q] * absmax2[block // BLOCKS2] + offset
            q = tl.load(absmax_ptr + index, mask=blocks_ok[None, :], other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + index // BLOCKS2, mask=blocks_ok[None, :],
                                                      other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + index, mask=blocks_ok[None, :], other=0.0)
    else:
        if NESTED:
            q = tl.load(absmax_ptr + index).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + index // BLOCKS2) + offset
        else:
            scale = tl.load(absmax_ptr + index)
    return tl.fma(sums, scale, acc)


@triton.jit
def gemv_4bit(x_ptr, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, b_ptr, y_ptr,
              n, row_words, per_row, stride_x, stride_y, QBLOCK: tl.constexpr, NB: tl.constexpr,
              BLOCK_N: tl.constexpr, NESTED: tl.constexpr, BLOCKS2: tl.constexpr, HAS_BIAS: tl.constexpr,
              SHUFFLE: tl.constexpr):
    """y[m, rows] = W[rows] @ x[m]: w_ptr int32 words, row_words = k / 8, per_row = k / QBLOCK
    (passed in so Triton sees their alignment), BLOCKS2 the nested block size (256). The tile is
    2-D, (BLOCK_N, NB * WORDS) words, so Triton lays a thread's 16 bytes along a row and the
    rows over registers and warps (a 3-D tile let Triton 3.6 spread rows over lanes, and each
    thread then re-read its x from shared memory for every row)."""
    WORDS: tl.constexpr = QBLOCK // 8
    W: tl.constexpr = NB * WORDS
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    rows = tl.minimum(rows, n - 1)
    col = tl.arange(0, W)
    blk = tl.arange(0, NB)
    w_ptrs = w_ptr + rows[:, None] * row_words + col[None, :]
    x_ptrs = x_ptr + m * stride_x + col[:, None] * 8 + tl.arange(0, 8)[None, :]
    index = rows[:, None] * per_row + blk[None, :]  # (BLOCK_N, NB) block numbers
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    table = _lane_code(code_ptr, m) if SHUFFLE else 0.0
    whole = per_row // NB * NB  # blocks in whole tiles
    words = tl.load(w_ptrs, mask=(col < whole * WORDS)[None, :], other=0)
    for start in range(0, whole, NB):
        step = tl.where(start + NB < whole, W, 0)  # the last step re-reads its own tile
        words_next = tl.load(w_ptrs + step)
        acc = _step(acc, words, x_ptrs, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, table, index,
                    col, blk, NB, WORDS, NESTED, BLOCKS2, SHUFFLE, False)
        w_ptrs += step
        x_ptrs += NB * QBLOCK
        index += NB
        words = words_next
    if whole < per_row:  # the blocks past the last whole tile
        words_ok = col < (per_row - whole) * WORDS
        w_ptrs += tl.where(whole > 0, W, 0)
        words = tl.load(w_ptrs, mask=words_ok[None, :], other=0)
        acc = _step(acc, words, x_ptrs, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, table, index,
                    words_ok, blk < per_row - whole, NB, WORDS, NESTED, BLOCKS2, SHUFFLE, True)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + m * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def gemv_4bit_any(x_ptr, w_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, b_ptr, y_ptr,
                  n, k, stride_x, stride_y, qblock, blocks2, NESTED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same product for any (n, k): w_ptr bytes, element e of the flattened weight in the
    high nibble of byte e // 2 when e is even, its block e // qblock."""
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    offset = tl.load(offset_ptr) if NESTED else 0.0
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < k)[None, :]
        flat = rows[:, None].to(tl.int64) * k + cols[None, :]
        byte = tl.load(w_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        index = flat // qblock
        if NESTED:
            q = tl.load(absmax_ptr + index, mask=ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + index // blocks2, mask=ok, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + index, mask=ok, other=0.0)
        x = tl.load(x_ptr + m * stride_x + cols, mask=cols < k, other=0.0).to(tl.float32)
        acc += tl.load(code_ptr + nibble) * scale * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_y + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

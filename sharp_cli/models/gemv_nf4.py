"""One-token products of bitsandbytes' 4-bit layers (Linear4bit, nf4 or fp4) through a Triton
matrix-vector kernel that reads the packed weights and their absmax directly, on CUDA.

bitsandbytes' format (functional.quantize_4bit, checked against its dequantize_4bit in
tests/test_gemv_nf4.py): an (n, k) weight flattened row-major, cut into blocks of `blocksize` (64)
values; block b keeps absmax[b] and each value as a 4-bit index into a 16-entry table
(QuantState.code: the nf4 quantiles, or fp4), two per byte, the even element in the high nibble.
Value e = code[nibble(e)] * absmax[e // blocksize]. With double quantization (compress_statistics,
what sharp loads) absmax is itself one uint8 per block: absmax[b] = code2[q[b]] * absmax2[b // 256]
+ offset (code2 the 256-entry dynamic map, absmax2 float32, offset one float32).

Why a kernel: a decode step is ~200 products of one token with a weight, and the GPU's work is
reading the weights. bitsandbytes' own one-token products read them at ~600 GB/s on an H200
(issue 26: 3.95 ms of a 7.41 ms nf4 step), a seventh of what the memory delivers. This kernel
(models/nf4_kernels.py) is the plain memory-bound loop: each program streams BLOCK_N whole rows
as int32 words, NB quantization blocks a step, the next step's words in flight while this one's
are summed; each nibble becomes its float32 code by a warp shuffle from a register that holds the
16 codes across the lanes (a scalar: each thread's own, see nf4_kernels._lane_code),
meets its x value in a fused multiply-add, and a block's sum is scaled
by its absmax once (one multiply per 64 weights). The codes stay float32, so the product differs
from bitsandbytes' (which rounds each dequantized weight to bf16 before its matmul) by that
rounding and the order of the float32 sums.

The floor, for Qwen2.5-VL-7B's text model (28 layers of q, k, v, o 3584x3584 / 512x3584 and gate,
up, down 18944x3584 / 3584x18944: 233.0M weights a layer): packed weights 116.5 MB + uint8 absmax
3.64 MB + absmax2 0.06 MB = 120.2 MB a layer, 3.37 GB a step, 0.78 ms at the ~4.3 TB/s an H200
copies; with the bf16 lm_head (1.09 GB, not quantized) 4.46 GB and 1.04 ms a step. Per product:
q and o 6.64 MB (1.5 us), k and v 0.95 MB (0.2 us: launch and latency bound), gate, up and down
35.1 MB (8.2 us). The work per weight bounds it too: one shuffle (the unit that serves shuffles and
shared memory does 32 lanes a clock per SM: ~8e12 weights/s on 132 SMs, ~4 TB/s of packed bytes,
just under the memory's rate) and about four instructions in all (a shift, the shuffle, the
multiply-add, a share of the x and absmax loads: ptxas' code for sm_90 from Triton 3.6,
`research/nf4_kernel_sass.py`), which the SMs issue at ~8e12 weights/s. So this design can reach
most of the bandwidth, not all of it; a lookup from memory instead of a shuffle took 2.8 times the
instructions (address arithmetic per weight), which is why the shuffle is inline PTX. Measured
figures go to docs/benchmarks.md (`python -m scripts.kernel_bench --nf4`).

Rows whose length is not a whole number of blocks (blocks straddle rows, odd k splits bytes)
take a slower per-element kernel; real checkpoints never do (k is a multiple of 64). Triton's CPU
interpreter (the tests) runs no inline assembly, so there the codes are loaded from the table.
x may hold several rows (batched decode): each is a program of its own, so the weights are
dequantized once per row and re-read from L2; the layers take the kernel for one token only.

`use_gemv_4bit(modules)` swaps each bitsandbytes Linear4bit among `modules` for a subclass (same
parameters, same state dict) whose forward takes the kernel for one token on CUDA and calls
bitsandbytes for everything else (prefill, other devices). Inside torch.compile and CUDA graphs
the kernel is one opaque custom op. On by default on CUDA since scripts/kernel_bench.py --nf4 and
scripts/cuda_check.py --quant nf4 passed with it on the GPU (docs/benchmarks.md, "The 4-bit
kernel"); SHARP_GEMV_NF4=0 leaves the products to bitsandbytes, and SHARP_GEMV=0 turns it off with
the bf16 kernel. Its first GPU runs were wrong (a layout conversion moved the code table between
threads), which is why it stayed off until both checks passed.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from sharp_cli.models.gemv import HALF, INTERPRETED, SWITCH

SWITCH_4BIT = "SHARP_GEMV_NF4"  # =0 leaves Linear4bit's one-token products to bitsandbytes
DEFAULT_4BIT = "1"  # on since scripts/kernel_bench.py --nf4 and scripts/cuda_check.py --quant nf4 passed


def available(device: torch.device) -> bool:
    """Whether use_gemv_4bit should swap for a model on `device`."""
    if os.environ.get(SWITCH, "1") == "0" or os.environ.get(SWITCH_4BIT, DEFAULT_4BIT) != "1":
        return False
    if device.type != "cuda" and not INTERPRETED:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_sizes(n: int, k: int, blocksize: int = 64) -> tuple[int, int, int]:
    """(BLOCK_N, NB, num_warps) for an (n, k) weight: rows per program, quantization blocks per row
    per step, warps. Chosen from the compiled code for an H200 (sm_90, Triton 3.6: registers and
    the main loop's instructions per weight, 4.1-4.6 with 4 warps: research/nf4_kernel_sass.py) and
    its 132 SMs, not yet from timings (`python -m scripts.kernel_bench --nf4 --sweep` times every candidate):
    a thread reads 16 bytes of a row, so a step of NB=8 blocks spreads a row over 16 lanes, and
    rows past the warps' reach repeat in registers, where they share the thread's x. 32 rows a
    program for gate and up (592 programs, 128 registers: 4 programs an SM); 16 for q and o (224
    programs); down's 3,584 rows of 296 blocks take 8 rows of NB=32 (448 programs, the last step
    masked), where 32 rows would leave 20 SMs idle; k and v (512 rows) take 4 rows and 2 warps (128
    programs). NB scales with the block size so a step reads the same bytes."""
    def blocks(nb64: int) -> int:
        return max(1, nb64 * 64 // blocksize)

    if n <= 1024:
        return 4, blocks(8), 2
    if k >= 8192:
        return 8, blocks(32), 4
    if n <= 4096:
        return 16, blocks(8), 4
    return 32, blocks(8), 4


@functools.cache  # imported on first use: Triton stays out of `sharp --help`
def _kernels():
    from sharp_cli.models import nf4_kernels

    return nf4_kernels.gemv_4bit, nf4_kernels.gemv_4bit_any


def _launch(x, packed, code, absmax, absmax2, code2, offset, bias, n: int, k: int, blocksize: int,
            blocksize2: int, out=None, sizes=None, shuffle: bool | None = None):
    """The kernels' common entry: x (..., k) float -> (..., n) in x's dtype (or into `out`);
    `packed` the weight's bytes (uint8, n * k / 2). `shuffle` forces the code lookup's kind (the
    benchmark compares both); by default shuffles on the GPU, loads under the interpreter."""
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = out if out is not None else x.new_empty(*x.shape[:-1], n)
    y2 = y.view(-1, n)
    nested = absmax2 is not None
    aligned, any_shape = _kernels()
    tensors = (absmax, absmax2 if nested else absmax, code2 if nested else code, offset if nested else code,
               bias if bias is not None else code, y2)
    if k % blocksize == 0 and blocksize >= 32 and blocksize & (blocksize - 1) == 0 and n * k < 2 ** 32:
        # rows start on a block and a word, tiles are powers of two, offsets fit int32
        block_n, nb, warps = sizes or block_sizes(n, k, blocksize)
        if INTERPRETED and sizes is None:  # the interpreter runs programs one by one: few, tall ones
            block_n = min(128, 1 << (n - 1).bit_length())
        aligned[(-(-n // block_n), rows.shape[0])](
            rows, packed.reshape(-1).view(torch.int32), code, *tensors, n, k // 8, k // blocksize, rows.stride(0),
            y2.stride(0), QBLOCK=blocksize, NB=nb, BLOCK_N=block_n, NESTED=nested, BLOCKS2=max(blocksize2, 1),
            HAS_BIAS=bias is not None, SHUFFLE=not INTERPRETED if shuffle is None else shuffle, num_warps=warps)
    else:
        any_shape[(-(-n // 16), rows.shape[0])](
            rows, packed, code, *tensors, n, k, rows.stride(0), y2.stride(0), blocksize, max(blocksize2, 1),
            NESTED=nested, HAS_BIAS=bias is not None, BLOCK_N=16, BLOCK_K=128, num_warps=4)
    return y


def state_tensors(state) -> tuple:
    """bitsandbytes' QuantState as the kernel's arguments: (code, absmax, absmax2, code2, offset,
    n, k, blocksize, blocksize2); the last three are None/0 without double quantization."""
    n, k = state.shape
    if state.nested:
        return (state.code, state.absmax, state.state2.absmax, state.state2.code, state.offset,
                n, k, state.blocksize, state.state2.blocksize)
    return state.code, state.absmax, None, None, None, n, k, state.blocksize, 0


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None, sizes: tuple[int, int, int] | None = None,
              shuffle: bool | None = None) -> torch.Tensor:
    """W @ x for a bitsandbytes 4-bit weight (`packed`: Params4bit's data, `state`: its
    QuantState) and x of shape (..., k): (..., n). `out` receives the result (the tests poison it
    first); `sizes` overrides block_sizes and `shuffle` the lookup (the benchmark's sweep)."""
    code, absmax, absmax2, code2, offset, n, k, blocksize, blocksize2 = state_tensors(state)
    return _launch(x, packed.view(torch.uint8), code, absmax, absmax2, code2, offset, bias, n, k,
                   blocksize, blocksize2, out=out, sizes=sizes, shuffle=shuffle)


# Registered at import (see gemv.py: torch.compile cannot trace into a cached lookup).
@torch.library.custom_op("sharp::gemv_4bit", mutates_args=())
def gemv_4bit_op(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                 absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                 bias: torch.Tensor | None, n: int, k: int, blocksize: int, blocksize2: int) -> torch.Tensor:
    """The kernel as a torch custom op, so torch.compile calls it as one opaque kernel."""
    return _launch(x, packed, code, absmax, absmax2, code2, offset, bias, n, k, blocksize, blocksize2)


@gemv_4bit_op.register_fake
def _(x, packed, code, absmax, absmax2, code2, offset, bias, n, k, blocksize, blocksize2):
    return x.new_empty(*x.shape[:-1], n)


class Gemv4bit:
    """Mixed into a Linear4bit class (see the module's docstring); `stock_class` is that class."""

    stock_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if x.numel() == x.shape[-1] and state is not None and ((x.is_cuda and x.dtype in HALF) or INTERPRETED) \
                and not x.requires_grad and not getattr(state, "packing_format_for_cpu", False):
            code, absmax, absmax2, code2, offset, n, k, blocksize, blocksize2 = state_tensors(state)
            return gemv_4bit_op(x, self.weight.data.view(torch.uint8), code, absmax, absmax2, code2, offset,
                                self.bias, n, k, blocksize, blocksize2)
        return super().forward(x)


_SWAPPED: dict[type, type] = {}


def _swapped_class(base: type) -> type:
    if base not in _SWAPPED:
        _SWAPPED[base] = type(f"Gemv{base.__name__}", (Gemv4bit, base), {"stock_class": base})
    return _SWAPPED[base]


def use_gemv_4bit(modules) -> int:
    """Swaps every bitsandbytes Linear4bit among `modules` (and their children) whose weight is
    quantized (nf4 or fp4, 2-D) to its kernel subclass; accelerate-hooked ones stay. Returns how
    many."""
    bnb = sys.modules.get("bitsandbytes")  # no Linear4bit can exist before bitsandbytes is imported
    if bnb is None:
        return 0
    swapped = 0
    for root in modules:
        for module in root.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if isinstance(module, bnb.nn.Linear4bit) and not isinstance(module, Gemv4bit) \
                    and state is not None and state.quant_type in ("nf4", "fp4") and len(state.shape) == 2 \
                    and not hasattr(module, "_hf_hook"):
                module.__class__ = _swapped_class(type(module))
                swapped += 1
    return swapped

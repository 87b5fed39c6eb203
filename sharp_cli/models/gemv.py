"""One-token products of the text model through a Triton matrix-vector kernel, on CUDA.

A decode step is ~200 products of one token with a weight matrix: the GPU's work is reading the
weights (14 GB a step for a 7B model in bf16). cuBLAS runs them as GEMMs with m = 1 and read them at
~3.1 TB/s on an H200 (4.57 ms of a 5.85 ms compiled step, research/results/h200-decode-profiles-compile.log),
two thirds of what the memory delivers. This kernel is the plain memory-bound loop: each program
streams BLOCK_N whole rows of the weight, K in BLOCK_K chunks, multiplies by the token in float32
and sums, so all it does is read each weight byte once. A step's products took 4.00 ms instead of
cuBLAS's 4.76 (H200, `python -m scripts.kernel_bench`, research/results/h200-gemv-bf16.json), and the
compiled pruned decode went from 188 to 219 tok/s.

`use_gemv(modules)` turns the given nn.Linear modules into `GemvLinear` (a class swap: same
parameters, same state dict), whose forward takes the kernel for one token on CUDA in bf16/fp16
and F.linear for everything else, so prefill and every other device or dtype are untouched.
`stock_linears(model)` swaps them back for the duration (the stock transformers rows of `sharp
bench` measure plain transformers). Inside torch.compile the kernel is one opaque custom op.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests' way in
SWITCH = "SHARP_GEMV"  # =0 keeps cuBLAS for every product (the A/B of docs/benchmarks.md)


def available(device: torch.device) -> bool:
    """Whether use_gemv should swap for a model on `device`."""
    if os.environ.get(SWITCH, "1") == "0" or (device.type != "cuda" and not INTERPRETED):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_sizes(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (n, k) weight, from scripts/kernel_bench.py's sweep on an
    H200 (research/results/h200-gemv-bf16.json): few rows per program where there are few rows (every
    SM gets work), long chunks of K where rows are long."""
    def chunk(width: int) -> int:
        return min(width, 1 << max(4, (k - 1).bit_length()))

    if n <= 1024:
        return 2, chunk(1024), 4
    if n <= 4096:
        return (16, chunk(1024), 8) if k >= 8192 else (4, chunk(512), 8)
    return 8, chunk(512), 4


@functools.cache  # made on first use: Triton is imported only then
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(w_ptr, x_ptr, b_ptr, y_ptr, n, k, stride_w, HAS_BIAS: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    return gemv


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         sizes: tuple[int, int, int] | None = None) -> torch.Tensor:
    """weight @ x for one token x of shape (..., k) with one row in all: (..., n). `sizes`
    overrides block_sizes (the benchmark's sweep)."""
    n, k = weight.shape
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    block_n, block_k, warps = sizes or block_sizes(n, k)
    _kernel()[(-(-n // block_n),)](
        weight, x, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


# Registered at import, not on first use behind functools.cache: torch.compile cannot trace into an
# lru_cache wrapper, so a cached lookup inside forward broke the compiled decode step at every linear
# (measured: 219 -> 190 tok/s, and dynamo's recompile limit hit on the text layers' index).
@torch.library.custom_op("sharp::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gemv as a torch custom op, so torch.compile calls it as one opaque kernel."""
    return gemv(x, weight, bias)


@gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


HALF = (torch.bfloat16, torch.float16)


class GemvLinear(nn.Linear):
    """nn.Linear whose one-token products go through the kernel (see the module's docstring)."""

    stock_class = nn.Linear  # what stock_linears swaps back to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_one_token(x, self.weight):
            return gemv_op(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def takes_one_token(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x is one token (one row in all) that the kernel takes with `weight`: CUDA bf16/fp16 (any dtype
    under the interpreter), the weight's dtype, a contiguous weight."""
    return x.numel() == x.shape[-1] and x.dtype == weight.dtype and weight.is_contiguous() \
        and ((x.is_cuda and x.dtype in HALF) or INTERPRETED)


def use_gemv(modules) -> int:
    """Swaps every plain bf16/fp16 nn.Linear among `modules` (and their children) to GemvLinear;
    quantized layers (bitsandbytes), accelerate-hooked ones and other dtypes stay. Returns how many."""
    swapped = 0
    for root in modules:
        for module in root.modules():
            if type(module) is nn.Linear and (module.weight.dtype in HALF or INTERPRETED) \
                    and not hasattr(module, "_hf_hook"):
                module.__class__ = GemvLinear
                swapped += 1
    return swapped


@contextmanager
def stock_linears(model, only: tuple[type, ...] = (object,)):
    """Every kernel layer of the model back to its stock class for the duration: GemvLinear to
    nn.Linear, and gemv_nf4's 4-bit layers to bitsandbytes' Linear4bit (their `stock_class`); with
    `only`, the swapped classes that subclass one of those (fused_vision.stock_modules)."""
    swapped = [(m, type(m)) for m in model.modules()
               if getattr(type(m), "stock_class", None) is not None and issubclass(type(m), only)]
    for module, kind in swapped:
        module.__class__ = kind.stock_class
    try:
        yield
    finally:
        for module, kind in swapped:
            module.__class__ = kind

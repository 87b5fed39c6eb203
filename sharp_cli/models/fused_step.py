"""The glue of a one-token decode step (RMSNorm, rotary embedding, SiLU(gate) * up) as one Triton
kernel each, for the text layers of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision's Qwen2.

Why: sharp's default step (no `--compile`) is a CUDA graph of eager transformers, where each of those
is a run of small kernels: an RMSNorm is seven (cast, square, mean, add, rsqrt, multiply, cast and
the weight), the rotary embedding ten for q and k (multiplies, rotate_half's slices, negation and
concatenation, adds), the MLP's activation two. A 7B step launches ~30 a layer, and on an H200 they
took 1.78 of the 7.05 ms of a bf16 step (issue 26; docs/benchmarks.md), the work that `--compile`
fuses away at the cost of a 1-2 minute first compile. Here each is one launch, with no compile:

- `rms_norm`: one program per row (a token's hidden state, or one head's q/k in Qwen3-VL's q_norm and
  k_norm). It rounds where transformers rounds (the normed row to the input dtype, then times the
  weight), so it differs from the stock module only by the float32 sum's order.
- `rotary`: q (batch, heads, 1, head_dim) and k (batch, kv_heads, 1, head_dim) in one launch, one
  program per head, given the step's cos and sin (batch, 1, head_dim) as transformers computed them
  (M-RoPE's sections are already in them). It rounds each product to the input dtype as the stock
  `q * cos + rotate_half(q) * sin` does, through the bits for bf16 (a float round trip let the GPU
  compiler fuse a product into an FMA: fused_kernels.round_to), so it gives the same numbers.
- `silu_mul`: SiLU(gate) * up in one pass (the activation rounded to the dtype first, as stock).

The residual adds stay (one kernel each): fusing them into the norm would need the decoder layer's
forward rewritten, and transformers' layers give no hook between the add and the norm.

`use_fused_step(text_model)` swaps the norms and MLPs (a class swap to a subclass made per stock
class: same parameters, same state dict) and the attention modules, whose subclass marks its calls so
that the modelling module's `apply_rotary_pos_emb` (replaced once by a dispatcher that calls the
original otherwise; the `kernels` package's per-module route exists only where that package is
installed) takes the kernel. Each takes its kernel only for one token per sequence on CUDA in
bf16/fp16, outside torch.compile (`--compile` fuses these itself); prefill, the CPU, float32 and the
compiled step run the stock code. gemv.stock_linears swaps all of it back (`stock_class`).

On by default on CUDA; SHARP_FUSED_STEP=0 keeps transformers' modules. What turned it on:
research/gpu_decode.sh's fused steps on an H100 (docs/benchmarks.md, "The fused step glue"):
`scripts.kernel_bench --fused` equal to transformers' in every piece and in a layer stepped over a
cache, `scripts.cuda_check` passing with it on, and `sharp bench`'s decode faster with it.
"""

from __future__ import annotations

import functools
import os
import sys
from contextvars import ContextVar

import torch

from sharp_cli.models.gemv import HALF, INTERPRETED

SWITCH = "SHARP_FUSED_STEP"  # =0 keeps the stock modules at load (loading.ready)
DEFAULT = "1"  # research/gpu_decode.sh's fused steps passed on an H100 (docs/benchmarks.md)

# The stock classes whose forward is what the kernels compute (transformers 5.x); others are left alone.
NORMS = {"Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm", "Qwen3VLTextRMSNorm"}
MLPS = {"Qwen2MLP", "Qwen3VLTextMLP"}
ATTENTIONS = {"Qwen2Attention", "Qwen2VLAttention", "Qwen2_5_VLAttention", "Qwen3VLTextAttention"}

_IN_FUSED_ATTENTION: ContextVar[bool] = ContextVar("sharp_fused_attention", default=False)


def available(device: torch.device) -> bool:
    """Whether use_fused_step should swap for a model on `device`."""
    if os.environ.get(SWITCH, DEFAULT) != "1" or (device.type != "cuda" and not INTERPRETED):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def served(x: torch.Tensor) -> bool:
    """A dtype and device the kernels take (any dtype under the interpreter: the tests' float32)."""
    return ((x.is_cuda and x.dtype in HALF) or INTERPRETED) and not torch.compiler.is_compiling()


def one_token(x: torch.Tensor) -> bool:
    """x is (batch, 1, ...): one new token per sequence, a decode step's."""
    return x.dim() >= 3 and x.shape[1] == 1 and served(x)


@functools.cache  # made on first use: Triton is imported only then
def _kernels():
    from sharp_cli.models import fused_kernels

    return fused_kernels.rms_norm, fused_kernels.rotary, fused_kernels.silu_mul


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 512 else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen RMSNorm of x (..., n): weight * (x / rms(x)).to(x.dtype), in the dtype
    transformers gives (weight's and x's promoted)."""
    n = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    block = pow2(n)
    _kernels()[0][(x.numel() // n,)](x, weight, y, n, eps, BLOCK=block, num_warps=_warps(block))
    return y


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q_embed, k_embed) of transformers' apply_rotary_pos_emb for one token: q (b, heads, 1, d),
    k (b, kv_heads, 1, d), each with unit stride over d; cos and sin (b or 1, 1, d) in their dtype."""
    b, q_heads, _, d = q.shape
    k_heads = k.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((b, q_heads, 1, d), device=q.device, dtype=q.dtype)
    k_out = torch.empty((b, k_heads, 1, d), device=k.device, dtype=k.dtype)
    block = pow2(d // 2)
    _kernels()[1][(q_heads + k_heads, b)](
        q, k, cos, sin, q_out, k_out, q_heads, k_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0) if cos.shape[0] > 1 else 0, HALF_DIM=d // 2, BLOCK=block, num_warps=1)
    return q_out, k_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, both (..., n) of one dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    block = min(1024, pow2(gate.numel()))
    _kernels()[2][(-(-gate.numel() // block),)](gate, up, y, gate.numel(), BLOCK=block, num_warps=4)
    return y


class _FusedNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if one_token(hidden_states):
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


class _FusedMLP:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_token(x):
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


def marking(flag: ContextVar) -> type:
    """A mixin whose forward sets `flag` for the duration of the stock forward (outside
    torch.compile): the modelling module's replaced function (install_dispatcher) takes a kernel only
    inside the calls of modules that carry it."""
    class Marking:
        def forward(self, *args, **kwargs):
            if torch.compiler.is_compiling():
                return super().forward(*args, **kwargs)
            token = flag.set(True)
            try:
                return super().forward(*args, **kwargs)
            finally:
                flag.reset(token)

    return Marking


_FusedAttention = marking(_IN_FUSED_ATTENTION)


@functools.cache
def fused_class(mixin: type, stock: type) -> type:
    """A subclass of the stock class with the mixin's forward; `stock_class` for gemv.stock_linears.
    It claims the stock class's module, where code finds the modelling functions by a module's class
    (adapter.rope: sys.modules[type(attention).__module__].apply_rotary_pos_emb)."""
    return type(f"Fused{stock.__name__}", (mixin, stock), {"stock_class": stock, "__module__": stock.__module__})


def _rotary_dispatcher(original):
    """The modelling module's apply_rotary_pos_emb: the kernel inside a fused attention module's
    call, for one token in a dtype it takes; `original` (transformers' own) for everything else."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not torch.compiler.is_compiling() and _IN_FUSED_ATTENTION.get() and unsqueeze_dim == 1 \
                and q.dim() == 4 and q.shape[2] == 1 and k.shape[2] == 1 and served(q) \
                and k.dtype == q.dtype == cos.dtype == sin.dtype and q.shape[-1] % 2 == 0 \
                and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.dim() == 3 and cos.shape[1] == 1 \
                and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] and cos.shape[0] in (1, q.shape[0]):
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.sharp_original = original
    return apply_rotary_pos_emb


def install_dispatcher(attention_class: type, name: str, make) -> bool:
    """Puts make(original) in place of the function `name` of the class's modelling module (once per
    module; every model of that module then calls it, and only marked modules take the kernel).
    False where the module has no such function."""
    module = sys.modules[attention_class.__module__]
    current = getattr(module, name, None)
    if current is None:
        return False
    if not hasattr(current, "sharp_original"):
        setattr(module, name, make(current))
    return True


def is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def swap_modules(root, mixin_for) -> int:
    """Each module under `root` not swapped yet becomes fused_class(mixin, its class) where
    mixin_for(module) names a mixin (None: left alone). Returns how many it swapped."""
    swapped = 0
    for module in root.modules():
        kind = type(module)
        mixin = None if hasattr(kind, "stock_class") else mixin_for(module)
        if mixin is not None:
            module.__class__ = fused_class(mixin, kind)
            swapped += 1
    return swapped


def use_fused_step(text_model) -> int:
    """Swaps the text model's norms, MLPs and attention modules for their fused subclasses (see the
    module's docstring). Returns how many modules it swapped."""
    def mixin_for(module):
        name = type(module).__name__
        if name in NORMS:
            return _FusedNorm
        if name in MLPS and is_silu(getattr(module, "act_fn", None)):
            return _FusedMLP
        if name in ATTENTIONS and install_dispatcher(type(module), "apply_rotary_pos_emb", _rotary_dispatcher):
            return _FusedAttention
        return None

    return swap_modules(text_model, mixin_for)

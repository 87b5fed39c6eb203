"""The Qwen vision tower's norms and rotary embedding as one Triton kernel each, without compiling.

Why: eager, a tower block's elementwise work is a dozen small kernels over every patch. On an H200
(`python -m scripts.profiler vision`, research/results/h200-decode-profiles-compile.log) they took
96.9 ms of a 32-frame tower's 239 ms kernel time, float32 multiplies and copies most of it: the
rotary embedding upcasts q and k to float32 (25,088 patches x 1,280 dims, 128 MB each), rotates
them by slicing, negating and concatenating, and rounds them back; each RMSNorm upcasts, squares,
averages, scales and rounds in separate passes. `--compile` fuses these (the tower 179-188 -> 108 ms
there), at a first-call compile; these kernels fuse them with no compile:

- rotary (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the same `apply_rotary_pos_emb_vision`): one program a
  patch reads its q and k heads straight from the qkv product's view and its cos and sin once,
  computes in float32 as transformers does, and writes both rotated, rounded once
  (fused_kernels.vision_rotary; launched with FMA contraction off, so every product and sum rounds
  to float32 as eager's separate kernels do);
- RMSNorm (Qwen2.5-VL's blocks and merger): fused_step's norm kernel, one program a row;
- SiLU(gate) * up (Qwen2.5-VL's gated MLPs, unless SHARP_VISION_FUSED_MLP already joined gate and
  up): fused_step's kernel, one pass instead of an activation and a product.

Qwen2-VL's and Qwen3-VL's blocks use LayerNorm, left to PyTorch (one kernel already).

With them, the patch embedding (all three towers): a Conv3d whose kernel equals its stride, i.e. one
matrix product of the patches (N, C*T*P*P) with the weight viewed (E, C*T*P*P). cuDNN ran it as an
implicit-GEMM float32 convolution, 3.10 ms of an 83.7 ms 32-frame tower on an H100
(`scripts.profiler vision`, research/results/h100-decode-s7.log); as a product it is ~75 GFLOP of
tensor-core work. Same numbers up to the sums' order.

Swaps as fused_step does: the attention modules (a subclass marks their calls, and the modelling
module's `apply_rotary_pos_emb_vision` is replaced once by a dispatcher that calls the original
otherwise) and the norms (a subclass per stock class; gemv.stock_linears and `stock_modules` swap
them back). Taken on CUDA in bf16/fp16 (any dtype under Triton's interpreter, for the tests),
never inside torch.compile (`--compile` fuses these itself). On by default since
research/vision_check.py's `kernels` row matched the stock tower within bf16 rounding and beat the
`fused` row on an H100 (docs/benchmarks.md); SHARP_FUSED_VISION=0 turns it off.
"""

from __future__ import annotations

import functools
import os
from contextvars import ContextVar

import torch

from sharp_cli.models import fused_step, gemv

SWITCH = "SHARP_FUSED_VISION"  # =1 swaps the kernels into the vision tower at load (loading.ready_vision)
DEFAULT = "1"  # research/vision_check.py's kernels row passed and paid on an H100 (docs/benchmarks.md); =0 off
NORMS = {"Qwen2_5_VLRMSNorm"}  # vision RMSNorm classes (transformers 5.x)
MLPS = {"Qwen2_5_VLMLP"}  # gated vision MLPs: down_proj(act_fn(gate_proj(x)) * up_proj(x))
PATCH_EMBEDS = {"PatchEmbed", "Qwen2_5_VisionPatchEmbed", "Qwen3VLVisionPatchEmbed"}  # Conv3d, kernel = stride
ATTENTIONS = {"VisionAttention", "Qwen2_5_VLVisionAttention", "Qwen3VLVisionAttention"}

_IN_VISION_ATTENTION: ContextVar[bool] = ContextVar("sharp_fused_vision_attention", default=False)


def available(device: torch.device) -> bool:
    """Whether loading.ready_vision should swap the kernels in for a tower on `device`."""
    return os.environ.get(SWITCH, DEFAULT) == "1" and fused_step.available(device)


@functools.cache  # made on first use: Triton is imported only then
def _kernel():
    from sharp_cli.models import fused_kernels

    return fused_kernels.vision_rotary


def vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb_vision: q and k (rows, heads, d) with unit stride over d
    (the qkv product's views: row stride 3 * heads * d), cos and sin (rows, d) in any float dtype.
    Returns (q_embed, k_embed), contiguous (rows, heads, d) in q's dtype, as transformers does."""
    rows, heads, d = q.shape
    q_out = torch.empty((rows, heads, d), device=q.device, dtype=q.dtype)
    k_out = torch.empty((rows, heads, d), device=k.device, dtype=k.dtype)
    if rows:
        _kernel()[(rows,)](q, k, cos, sin, q_out, k_out, heads, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), cos.stride(0), sin.stride(0), HALF_DIM=d // 2,
                           BLOCK_H=fused_step.pow2(heads), BLOCK=fused_step.pow2(d // 2), num_warps=4,
                           enable_fp_fusion=False)
    return q_out, k_out


def _takes(q, k, cos, sin) -> bool:
    """The shapes and layout the kernel takes (what the three towers pass); anything else: stock."""
    return (not torch.compiler.is_compiling() and _IN_VISION_ATTENTION.get() and q.dim() == 3
            and q.shape == k.shape and q.dtype == k.dtype and fused_step.served(q) and q.shape[-1] % 2 == 0
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.shape == sin.shape == (q.shape[0], q.shape[-1])
            and cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.is_floating_point() and sin.is_floating_point())


def _rotary_dispatcher(original):
    def apply_rotary_pos_emb_vision(q, k, cos, sin):
        if _takes(q, k, cos, sin):
            return vision_rotary(q, k, cos, sin)
        return original(q, k, cos, sin)

    apply_rotary_pos_emb_vision.sharp_original = original
    return apply_rotary_pos_emb_vision


class _FusedVisionNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if fused_step.served(hidden_states) and hidden_states.numel():
            return fused_step.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


class _FusedVisionMLP:
    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if fused_step.served(hidden_state) and hidden_state.numel():
            return self.down_proj(fused_step.silu_mul(self.gate_proj(hidden_state), self.up_proj(hidden_state)))
        return super().forward(hidden_state)


class _PatchEmbedProduct:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (patches, C * T * P * P) -> (patches, embed_dim), as the stock Conv3d."""
        weight = self.proj.weight  # (E, C, T, P, P); the pixels come in float32, so the weight says where
        width = weight[0].numel()
        if not (fused_step.served(weight) and _is_a_product(self.proj) and hidden_states.shape[-1] == width):
            return super().forward(hidden_states)
        x = hidden_states.reshape(-1, width).to(weight.dtype)
        return torch.nn.functional.linear(x, weight.reshape(weight.shape[0], -1), self.proj.bias)


def _is_a_product(conv) -> bool:
    """A Conv3d that is one matrix product per patch: kernel = stride, no padding, dilation or groups."""
    if not isinstance(conv, torch.nn.Conv3d):
        return False
    padding = conv.padding
    unpadded = padding == "valid" or (isinstance(padding, tuple) and not any(padding))
    return (tuple(conv.kernel_size) == tuple(conv.stride) and unpadded and set(conv.dilation) == {1}
            and conv.groups == 1)


_FusedVisionAttention = fused_step.marking(_IN_VISION_ATTENTION)


def use_fused_vision(visual) -> int:
    """Swaps the tower's RMSNorms, gated MLPs, attention modules and patch embedding for their fused
    subclasses; returns how many."""
    def mixin_for(module):
        name = type(module).__name__
        if name in NORMS:
            return _FusedVisionNorm
        if name in MLPS and fused_step.is_silu(getattr(module, "act_fn", None)):
            return _FusedVisionMLP
        if name in ATTENTIONS and fused_step.install_dispatcher(type(module), "apply_rotary_pos_emb_vision",
                                                                 _rotary_dispatcher):
            return _FusedVisionAttention
        if name in PATCH_EMBEDS and _is_a_product(getattr(module, "proj", None)):
            return _PatchEmbedProduct
        return None

    return fused_step.swap_modules(visual, mixin_for)


def stock_modules(visual):
    """A context: the tower's fused modules back to their stock classes for the duration (the other
    swapped classes, the padded MLPs', stay): research/vision_check.py's row without the kernels."""
    return gemv.stock_linears(visual, only=(_FusedVisionNorm, _FusedVisionMLP, _FusedVisionAttention,
                                            _PatchEmbedProduct))

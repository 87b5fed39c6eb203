"""Zero-pad a vision tower's gated MLPs to an aligned width, and run gate and up as one product.

Padding. Qwen2.5-VL's vision blocks have an intermediate size of 3,420: rows of 6,840 bytes, which
are not 16-byte aligned, so cuBLAS falls back to its 2-element-aligned kernels. On an H200 those
three products per block took 90 of the encoder's 239 ms for 32 frames; aligned, the same products
take ~45 ms (research/results/h200-decode-profiles-compile.log, `python -m scripts.profiler vision`).
Padding is exact: the new gate rows and biases are zero, so act(gate) * up is zero there (SiLU(0)
= 0), and the new down-projection columns are zero as well, so they add nothing.

Fusing. The block's MLP is down(act(gate(x)) * up(x)): two products of the same x (N, D) with
(W, D) weights. The padded gate and up weights are written into one (2W, D) allocation, gate's rows
first, and gate_proj/up_proj keep views of its two halves (same parameter names, shapes and state
dict), so one GEMM, x @ [gate; up]^T -> (N, 2W), makes both: the same dot products (bitwise the
same where the GEMM keeps its reduction order, as on the CPU; research/vision_check.py measures the
GPU against fp32), x read once, one launch instead of two (`FUSED` classes only, whose forward is
exactly that formula). Each MLP's weights are rewritten in turn and the old ones dropped, so the load
never holds two copies of the tower. The fused forward checks that the two halves still sit side by
side in one allocation (a `.to()` or `unpadded` separates them) and runs the stock forward otherwise,
and under torch.compile (`--compile` compiles the blocks, which fuses on its own terms).

Padding is done where it pays (`pays_on`): on CUDA, and on a CPU in float32, where the aligned width
made the three products faster as well; a CPU in bfloat16 ran both widths at the same speed, so a
bf16 CPU load skips the copy of every vision MLP weight, seconds of a 3B model's load there
(`python -m scripts.load_bench --mlp-widths`; docs/benchmarks.md, "Model load"). Fusing rides on the
padding's one copy, but measured slower on an H200 (docs/benchmarks.md, "Vision encoder"): it is off
unless SHARP_VISION_FUSED_MLP=1 (`fusing`).

Qwen2-VL's (fc1 -> act -> fc2) and Qwen3-VL's (linear_fc1 -> act -> linear_fc2) vision MLPs are not
gated: one product in, one out, widths 5,120 and 4,304 already aligned; nothing here applies to them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

ALIGN = 64  # elements: any multiple of 8 gives aligned bf16 rows; 64 also suits the GEMM tiles
FUSED = {"Qwen2_5_VLMLP"}  # MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
SWITCH = "SHARP_VISION_FUSED_MLP"  # =1: gate and up as one product at load (loading.ready_vision)


def fusing() -> bool:
    """Whether a load fuses gate and up (off by default: 3-6% slower on an H200)."""
    import os

    return os.environ.get(SWITCH) == "1"


def pays_on(device, dtype) -> bool:
    """Whether padding makes the vision MLPs faster on `device` in `dtype` (module docstring)."""
    import torch

    return device.type == "cuda" or dtype == torch.float32


def pad_gated_mlps(visual, align: int = ALIGN, fuse: bool = True) -> int:
    """Pads every block's gate/up/down projections in place, gate and up in one allocation for the
    `FUSED` classes when `fuse`; returns how many MLPs it changed."""
    import torch

    changed = 0
    for module in visual.modules():
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if not all(type(m) is torch.nn.Linear for m in (gate, up, down)):  # quantized or another shape
            continue
        width = gate.out_features
        target = -(-width // align) * align
        fusable = fuse and type(module).__name__ in FUSED and (gate.bias is None) == (up.bias is None)
        if (
            getattr(module, "sharp_widths", None)
            or up.out_features != width
            or down.in_features != width
            or (target == width and not fusable)
        ):
            continue
        _layout(module, target, fusable)
        module.sharp_widths, module.sharp_fused = (width, target), fusable
        if fusable:
            module.__class__ = _fused_class(type(module))
        changed += 1
    return changed


@contextmanager
def unpadded(visual):
    """The stock widths, gate and up in allocations of their own, for the duration, so that the
    stock transformers rows of `sharp bench` run the products (and hold the memory) plain
    transformers does; padded (and fused) again afterwards. One copy of the weights at a time: the
    cut and the padding are exact both ways."""
    modules = [m for m in visual.modules() if getattr(m, "sharp_widths", None)]
    for module in modules:
        _layout(module, module.sharp_widths[0], fused=False)
    try:
        yield
    finally:
        for module in modules:
            _layout(module, module.sharp_widths[1], fused=module.sharp_fused)


def stacked(gate, up):
    """(weight (2W, D), bias (2W,) or None) viewing gate's and up's parameters as one, when they
    sit side by side in one allocation (`_layout`); None when they do not."""

    def joined(a, b):
        if a is None or b is None:
            return None if a is None and b is None else False
        if (
            not (a.is_contiguous() and b.is_contiguous() and a.shape == b.shape)
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
            or b.storage_offset() != a.storage_offset() + a.numel()
        ):
            return False
        return a.as_strided((2 * a.shape[0], *a.shape[1:]), a.stride())

    weight, bias = joined(gate.weight, up.weight), joined(gate.bias, up.bias)
    return None if weight is None or weight is False or bias is False else (weight, bias)


class _FusedGateUp:
    def forward(self, hidden_state):
        import torch
        import torch.nn.functional as F

        both = None if torch.compiler.is_compiling() else stacked(self.gate_proj, self.up_proj)
        if both is None:
            return super().forward(hidden_state)
        gate, up = F.linear(hidden_state, *both).chunk(2, dim=-1)  # (N, 2W) -> two (N, W) views
        return self.down_proj(self.act_fn(gate) * up)


@functools.cache
def _fused_class(stock: type) -> type:
    """The stock MLP class with the one-GEMM forward; `stock_class` lets gemv.stock_linears (the
    stock rows) swap it back."""
    return type(f"Fused{stock.__name__}", (_FusedGateUp, stock), {"stock_class": stock, "__module__": stock.__module__})


def _layout(mlp, width: int, fused: bool) -> None:
    """gate/up rows and down columns cut or zero-padded to `width`, as new tensors: gate and up in
    one (2 * width, D) allocation when `fused`, each in its own otherwise. Old weights are dropped as
    each projection is replaced (one MLP's gate and up extra at most)."""
    import torch

    def fit(tensor, dim):
        now = tensor.shape[dim]
        if width <= now:  # a clone, not .contiguous(): a cut of a fused half must not keep the whole alive
            return tensor.narrow(dim, 0, width).clone(memory_format=torch.contiguous_format)
        # One allocation and one pass over the weight: a third faster than zeros + cat on a CPU.
        pad = [0, 0] * (tensor.dim() - 1 - dim) + [0, width - now]
        return torch.nn.functional.pad(tensor, pad)

    def joint(a, b):  # [a; b], each cut or zero-padded to `width` rows: one allocation, one pass
        out = a.new_empty((2 * width, *a.shape[1:]))
        for half, src in zip(out.split(width), (a, b)):
            n = min(width, src.shape[0])
            half[:n].copy_(src[:n])
            half[n:].zero_()
        return out

    param = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
    gate, up = mlp.gate_proj, mlp.up_proj
    with torch.no_grad():
        if fused:
            weight = joint(gate.weight, up.weight)
            bias = joint(gate.bias, up.bias) if gate.bias is not None else None
            gate.weight, up.weight = param(weight[:width]), param(weight[width:])
            if bias is not None:
                gate.bias, up.bias = param(bias[:width]), param(bias[width:])
        else:
            for proj in (gate, up):
                proj.weight = param(fit(proj.weight, 0))
                if proj.bias is not None:
                    proj.bias = param(fit(proj.bias, 0))
        gate.out_features = up.out_features = width
        mlp.down_proj.weight = param(fit(mlp.down_proj.weight, 1))
        mlp.down_proj.in_features = width

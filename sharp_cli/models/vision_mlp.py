"""Zero-pad a vision tower's gated MLPs to an aligned width.

Qwen2.5-VL's vision blocks have an intermediate size of 3,420: rows of 6,840 bytes, which are not
16-byte aligned, so cuBLAS falls back to its 2-element-aligned kernels. On an H200 those three
products per block took 90 of the encoder's 239 ms for 32 frames; aligned, the same products take
~45 ms (research/results/h200-decode-profiles-compile.log, `python -m scripts.profiler vision`).

Padding is exact: the new gate rows and biases are zero, so act(gate) * up is zero there (SiLU(0)
= 0), and the new down-projection columns are zero as well, so they add nothing.

It is done where it pays (`pays_on`): on CUDA, and on a CPU in float32, where the aligned width
made the three products faster as well; a CPU in bfloat16 ran both widths at the same speed, so a
bf16 CPU load skips the copy of every vision MLP weight, seconds of a 3B model's load there
(`python -m scripts.load_bench --mlp-widths`; docs/benchmarks.md, "Model load").
"""

from __future__ import annotations

from contextlib import contextmanager

ALIGN = 64  # elements: any multiple of 8 gives aligned bf16 rows; 64 also suits the GEMM tiles


def pays_on(device, dtype) -> bool:
    """Whether padding makes the vision MLPs faster on `device` in `dtype` (module docstring)."""
    import torch

    return device.type == "cuda" or dtype == torch.float32


def pad_gated_mlps(visual, align: int = ALIGN) -> int:
    """Pads every block's gate/up/down projections in place; returns how many MLPs it padded."""
    import torch

    padded = 0
    for module in visual.modules():
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if not all(type(m) is torch.nn.Linear for m in (gate, up, down)):  # quantized or another shape
            continue
        width = gate.out_features
        target = -(-width // align) * align
        if target == width or up.out_features != width or down.in_features != width:
            continue
        _resize(module, target)
        module.sharp_widths = (width, target)
        padded += 1
    return padded


@contextmanager
def unpadded(visual):
    """The stock widths for the duration, so that the stock transformers rows of `sharp bench` run
    the products (and hold the memory) plain transformers does; padded again afterwards. One copy
    of the weights at a time: the cut and the padding are exact both ways."""
    modules = [m for m in visual.modules() if getattr(m, "sharp_widths", None)]
    for module in modules:
        _resize(module, module.sharp_widths[0])
    try:
        yield
    finally:
        for module in modules:
            _resize(module, module.sharp_widths[1])


def _resize(mlp, width: int) -> None:
    """gate/up rows and down columns cut or zero-padded to `width`, as new contiguous tensors."""
    import torch

    def fit(tensor, dim):
        now = tensor.shape[dim]
        if width <= now:
            return tensor.narrow(dim, 0, width).contiguous()
        # One allocation and one pass over the weight: a third faster than zeros + cat on a CPU.
        pad = [0, 0] * (tensor.dim() - 1 - dim) + [0, width - now]
        return torch.nn.functional.pad(tensor, pad)

    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight = torch.nn.Parameter(fit(proj.weight, 0), requires_grad=False)
            if proj.bias is not None:
                proj.bias = torch.nn.Parameter(fit(proj.bias, 0), requires_grad=False)
            proj.out_features = width
        mlp.down_proj.weight = torch.nn.Parameter(fit(mlp.down_proj.weight, 1), requires_grad=False)
        mlp.down_proj.in_features = width

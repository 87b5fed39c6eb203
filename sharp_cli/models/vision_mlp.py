"""Zero-pad a vision tower's gated MLPs to an aligned width.

Qwen2.5-VL's vision blocks have an intermediate size of 3,420: rows of 6,840 bytes, which are not
16-byte aligned, so cuBLAS falls back to its 2-element-aligned kernels. On an H200 those three
products per block took 90 of the encoder's 239 ms for 32 frames; aligned, the same products take
~45 ms (docs/results/h200-decode-profiles-compile.log, `scripts/profile_vision.py`).

Padding is exact: the new gate rows and biases are zero, so act(gate) * up is zero there (SiLU(0)
= 0), and the new down-projection columns are zero as well, so they add nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

ALIGN = 64  # elements: any multiple of 8 gives aligned bf16 rows; 64 also suits the GEMM tiles


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
        extra = target - width
        with torch.no_grad():
            for proj in (gate, up):
                proj.weight = torch.nn.Parameter(torch.cat([proj.weight, proj.weight.new_zeros(extra, proj.in_features)]),
                                                 requires_grad=False)
                if proj.bias is not None:
                    proj.bias = torch.nn.Parameter(torch.cat([proj.bias, proj.bias.new_zeros(extra)]),
                                                   requires_grad=False)
                proj.out_features = target
            down.weight = torch.nn.Parameter(torch.cat([down.weight, down.weight.new_zeros(down.out_features, extra)],
                                                       dim=1), requires_grad=False)
            down.in_features = target
        module.sharp_unpadded_width = width
        padded += 1
    return padded


@contextmanager
def unpadded(visual):
    """The stock layout for the duration (contiguous copies of the original rows and columns), so
    that the stock transformers rows of `sharp bench` run the products plain transformers runs."""
    import torch

    saved = []
    for module in visual.modules():
        width = getattr(module, "sharp_unpadded_width", None)
        if width is None:
            continue
        projections = (module.gate_proj, module.up_proj, module.down_proj)
        saved.append((projections, [(p.weight, p.bias) for p in projections]))
        for proj in projections[:2]:
            proj.weight = torch.nn.Parameter(proj.weight[:width].contiguous(), requires_grad=False)
            if proj.bias is not None:
                proj.bias = torch.nn.Parameter(proj.bias[:width].contiguous(), requires_grad=False)
            proj.out_features = width
        down = projections[2]
        down.weight = torch.nn.Parameter(down.weight[:, :width].contiguous(), requires_grad=False)
        down.in_features = width
    try:
        yield
    finally:
        for projections, params in saved:
            for proj, (weight, bias) in zip(projections, params):
                proj.weight, proj.bias = weight, bias
            projections[0].out_features = projections[1].out_features = projections[0].weight.shape[0]
            projections[2].in_features = projections[2].weight.shape[1]

"""Does bitsandbytes' 4-bit product agree with its own dequantized weights on this machine?

A load in nf4 checks one layer (a few milliseconds) and says so in one line when bitsandbytes'
product is not the product of its own dequantized weight: a bitsandbytes build that does not fit the
GPU or CUDA computes another matrix without an error. On an H200 with torch 2.11 + CUDA 13 and
bitsandbytes 0.50.2, Linear4bit and matmul_4bit agree with the dequantized weight to 3.7e-3 at 1, 4
and 64 rows, nf4 and fp4, nested or not (research/bnb_check.py; docs/benchmarks.md, "The 4-bit
kernel").
Quantization itself moves a product by ~0.1 of its norm against the original weight; two
routes to the same quantized weight differ only by rounding (~4e-3 in bf16), so 0.05 separates
"the same matrix" from "another one".
"""

from __future__ import annotations

LIMIT = 0.05


def four_bit_error(model) -> float | None:
    """Relative error ||y - exact|| / ||exact|| of the first bitsandbytes Linear4bit in `model` on one
    random row x (1, in_features), against float64 x @ dequantize_4bit(W).T + b; None without one.
    Run it before sharp swaps in its own 4-bit kernel (models/gemv_nf4.py): it judges bitsandbytes'."""
    import torch

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        return None
    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None or getattr(layer.weight, "quant_state", None) is None:
        return None
    weight = layer.weight
    dtype = layer.compute_dtype or (layer.bias.dtype if layer.bias is not None else torch.bfloat16)
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(1, layer.in_features, generator=generator, device=weight.device, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        exact = x.double() @ F.dequantize_4bit(weight.data, weight.quant_state).double().T
        if layer.bias is not None:
            exact = exact + layer.bias.double()
    return ((y.double() - exact).norm() / exact.norm()).item()


def warning(model) -> str | None:
    """The one line to print when bitsandbytes' product is not its own weight's, else None. A check
    that cannot run (another bitsandbytes' internals) says nothing: it must never stop a load."""
    try:
        error = four_bit_error(model)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    if error is None or error <= LIMIT:
        return None
    import bitsandbytes as bnb

    return (f"warning: bitsandbytes {bnb.__version__}'s 4-bit product differs from its own dequantized "
            f"weights on this GPU (relative error {error:.2f}, expected < {LIMIT}): nf4 answers may be wrong; "
            "use --quant none or another bitsandbytes release (docs/troubleshooting.md)")

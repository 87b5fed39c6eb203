"""Does bitsandbytes' 4-bit product equal its own dequantized weight's product on this GPU?

On an H200 (torch 2.11 + CUDA 13, bitsandbytes 0.50.2) `scripts.kernel_bench --nf4` found
`matmul_4bit` with one row a relative 1.3-2.3 away from x @ dequantize_4bit(W).T, while sharp's
kernel agreed with the dequantized weight to bf16 rounding (docs/benchmarks.md, "The 4-bit
kernel"). This probe separates the cases: through `bnb.nn.Linear4bit` (what transformers uses)
and the functional call, nf4 and fp4, double quantization on and off, 1, 4 and 64 rows, the 7B's
q and gate shapes. Each line: relative error against the float64 product of the dequantized
weight, and against the float64 product of the original weight (what quantization itself costs,
~0.1). Exit 1 if any product is further than 0.05 from the dequantized weight's.

    python -m research.bnb_check            # on the GPU machine, after research/gpu_setup.sh
"""

from __future__ import annotations

import sys


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    worst = 0.0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((3584, 3584), (18944, 3584)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for quant_type in ("nf4", "fp4"):
            for nested in (True, False):
                layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=nested, quant_type=quant_type)
                layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=nested,
                                                 quant_type=quant_type)
                layer = layer.cuda()
                state = layer.weight.quant_state
                dequantized = F.dequantize_4bit(layer.weight.data, state).double()
                for rows in (1, 4, 64):
                    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                    with torch.no_grad():
                        module = layer(x)
                        functional = bnb.matmul_4bit(x, layer.weight.t(), quant_state=state)
                    exact = x.double() @ dequantized.T
                    errors = {"Linear4bit": relative(module, exact), "matmul_4bit": relative(functional, exact)}
                    worst = max(worst, *errors.values())
                    cost = relative(exact, x.double() @ w.double().T)
                    print(f"{n:>6}x{k:<6} {quant_type} nested={nested!s:<5} rows={rows:<3} "
                          + " ".join(f"{name} {e:.1e}" for name, e in errors.items())
                          + f"  (quantization itself {cost:.1e})")
    ok = worst <= 0.05
    print(f"[{'ok' if ok else 'FAIL'}] bitsandbytes' products within 0.05 of its dequantized weight's (worst {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What ptxas makes of sharp's 4-bit kernel (sharp_cli/models/nf4_kernels.py) for an H100/H200
(sm_90), without a GPU: registers, spills, and the main loop's instructions per weight by opcode.

Triton compiles ahead of time for a named target; ptxas and cuobjdump come with Triton's wheel.
The figures in gemv_nf4.py's docstrings come from this (with the Triton the device runs: put its
wheel's folder first on PYTHONPATH to compile with another version than the venv's).

    python scripts/nf4_kernel_sass.py [--sizes 4,8,2 16,8,4 32,8,4 8,32,4] [--table]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compile_sm90(block_n: int, nb: int, warps: int, shuffle: bool, nested: bool, folder: str) -> str:
    """Path of the cubin of one variant (bf16 x and y, bias, blocksize 64, 7B-like alignment)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sharp_cli.models import nf4_kernels

    fn = nf4_kernels.gemv_4bit
    names = fn.arg_names
    types = ["*bf16", "*i32", "*fp32", "*u8" if nested else "*fp32", "*fp32", "*fp32", "*fp32", "*bf16", "*bf16",
             "i32", "i32", "i32", "i32", "i32"]
    signature = dict(zip(names, types))
    constants = {"QBLOCK": 64, "NB": nb, "BLOCK_N": block_n, "NESTED": nested, "BLOCKS2": 256, "HAS_BIAS": True,
                 "SHUFFLE": shuffle}
    signature.update({name: "constexpr" for name in constants})
    aligned = [i for i, name in enumerate(names) if name.endswith("_ptr") or name in ("row_words", "stride_x",
                                                                                        "stride_y")]
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = os.path.join(folder, f"k{block_n}_{nb}_{warps}_{int(shuffle)}{int(nested)}.ptx")
    Path(ptx).write_text(kernel.asm["ptx"])
    return ptx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["4,8,2", "16,8,4", "32,8,4", "8,32,4"],
                        help="BLOCK_N,NB,warps each")
    parser.add_argument("--table", action="store_true", help="the table-load lookup instead of the shuffle")
    parser.add_argument("--plain", action="store_true", help="float32 absmax instead of double quantization")
    args = parser.parse_args()
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    print(f"Triton {triton.__version__}, sm_90, {'table loads' if args.table else 'shuffles'}, "
          f"{'float32' if args.plain else 'double-quantized'} absmax")
    with tempfile.TemporaryDirectory() as folder:
        for sizes in args.sizes:
            block_n, nb, warps = map(int, sizes.split(","))
            ptx = compile_sm90(block_n, nb, warps, not args.table, not args.plain, folder)
            cubin = ptx[:-4] + ".cubin"
            info = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                                  capture_output=True, text=True, check=True).stderr
            sass = subprocess.run([str(tools / "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                  check=True).stdout
            code = [(int(m.group(1), 16), m.group(2).strip()) for m in
                    re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
            loops = [(int(t.group(1), 16), address) for address, text in code if "BRA" in text
                     for t in [re.search(r"0x([0-9a-f]+)", text)] if t and int(t.group(1), 16) < address]
            weights = block_n * nb * 64 / (warps * 32)  # a thread's weights in one step
            regs = re.search(r"Used (\d+) registers", info).group(1)
            spills = re.search(r"(\d+) bytes spill stores", info).group(1)
            for start, end in loops[:1]:  # the whole-tile loop
                body = [text for address, text in code if start <= address <= end]
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
                print(f"BLOCK_N={block_n:2d} NB={nb:2d} warps={warps}: {regs} registers, {spills} bytes spilled; "
                      f"loop {len(body)} instructions for {weights:.0f} weights a thread = "
                      f"{len(body) / weights:.2f} a weight; {dict(ops.most_common(8))}")


if __name__ == "__main__":
    main()

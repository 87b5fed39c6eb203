"""sharp's 4-bit matrix-vector kernel (models/gemv_nf4.py, models/nf4_kernels.py) against
bitsandbytes on weights bitsandbytes quantized itself, run by Triton's CPU interpreter in a
subprocess (the interpreter is chosen when Triton compiles): the kernel against bitsandbytes'
dequantize_4bit (float32, exactly) and its own product (matmul_4bit, bf16) on shapes that fill no
tile, do not split into whole blocks or bytes, with and without double quantization; whole answers
through 4-bit layers against bitsandbytes' own layers; the layer under torch.compile. The GPU's
shuffle lookup (inline PTX, which the interpreter cannot run) is checked by the last test on CUDA
and by scripts/kernel_bench.py --nf4."""

from __future__ import annotations

import textwrap

import pytest

from conftest import triton_interpreted

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

def _interpreted(code: str, prelude: str = "") -> str:
    return triton_interpreted(textwrap.dedent(prelude) + textwrap.dedent(code), timeout=900, SHARP_GEMV_NF4="1")


# A 4-bit copy of a module's nn.Linear layers, quantized by bitsandbytes itself (what transformers'
# BitsAndBytesConfig does on load, minus the GPU); CPU-only repacking off, as it never happens on CUDA.
QUANTIZE = """
    import torch, bitsandbytes as bnb

    def quantize(root, compute_dtype=torch.float32, nested=True):
        for name, module in list(root.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child).__name__ in ("Linear", "GemvLinear"):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                                 compress_statistics=nested, quant_type="nf4")
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                    q = q.to("cpu")
                    q.support_avx512bf16_for_cpu = False
                    setattr(module, child_name, q)
        return root
"""


def test_the_kernel_equals_bitsandbytes_on_awkward_shapes():
    out = _interpreted("""
        import torch, bitsandbytes as bnb, bitsandbytes.functional as F
        from sharp_cli.models import gemv_nf4
        torch.manual_seed(0)
        cases = [  # (n, k, blocksize, sizes): whole tiles and a masked last step, a last step only,
            (37, 64 * 11, 64, None), (40, 512, 64, (8, 8, 4)), (33, 64 * 19, 64, (16, 16, 4)),
            (70, 128 * 5, 128, (32, 2, 4)), (16, 96, 32, None),  # rows past n, other block sizes,
            (37, 100, 64, None), (5, 3, 64, None), (3, 70, 64, None)]  # blocks straddling rows, odd k
        for case, (n, k, blocksize, sizes) in enumerate(cases):
            for nested in (False, True):
                for kind in ("nf4", "fp4") if case in (0, 5) else ("nf4",):  # fp4: the same kernels, its table
                    w = torch.randn(n, k) * 0.05
                    packed, state = F.quantize_4bit(w.bfloat16(), blocksize=blocksize,
                                                    compress_statistics=nested, quant_type=kind)
                    bias = torch.randn(n)
                    # float32: the dequantized weight's exact product, to float32 summing
                    x = torch.randn(3, k)
                    out = torch.full((3, n), float("nan"))
                    ours = gemv_nf4.gemv_4bit(x, packed, state, bias, out=out, sizes=sizes).double()
                    state.dtype = torch.float32
                    exact = x.double() @ F.dequantize_4bit(packed, state).double().T + bias.double()
                    state.dtype = torch.bfloat16
                    assert not ours.isnan().any(), (n, k)
                    scale = x.double().abs() @ F.dequantize_4bit(packed, state).double().abs().T
                    err = (ours - exact).abs()
                    assert (err <= 1e-5 * scale + 1e-6).all(), (n, k, blocksize, nested, kind, err.max())
                    # bf16 in and out against bitsandbytes' own product (weights rounded to bf16 first):
                    # within a bf16 step of each result and bf16 rounding of each weight
                    xb, bb = x[:1].bfloat16(), bias.bfloat16()
                    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16)
                    ours = gemv_nf4.gemv_4bit(xb, packed, state, bb, out=out, sizes=sizes).double()
                    theirs = bnb.matmul_4bit(xb, packed.t(), quant_state=state, bias=bb).double()
                    scale = xb.double().abs() @ F.dequantize_4bit(packed, state).double().abs().T
                    err = (ours - theirs).abs()
                    assert (err <= theirs.abs() * 2 ** -7 + scale * 2 ** -8 + 1e-3).all(), (n, k, err.max())
        print("ok")
    """)
    assert out.strip() == "ok"


def test_answers_through_4bit_layers_equal_bitsandbytes_layers():
    """Method none through the kernel (every one-token product of the text model's Linear4bit
    layers, nothing else) gives the tokens bitsandbytes' own layers give; stock_linears swaps
    back; the pruned answer matches too."""
    out = _interpreted(prelude=QUANTIZE, code="""
        from conftest import make_clip
        from sharp_cli import loading
        from sharp_cli.answer import ask
        from sharp_cli.models import adapter_for, gemv, gemv_nf4
        from sharp_cli.models.random_init import build_random, tiny_config
        from sharp_cli.prune import PruneConfig

        config = tiny_config("qwen2.5-vl", layers=4)
        model, processor = build_random(config, dtype="float32")
        quantize(model.model.language_model)
        loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), "tiny-nf4",
                                              torch.device("cpu"), torch.float32, "nf4", True))
        model.lm_head.__class__ = torch.nn.Linear  # the bf16 kernel is test_gemv's (and slow interpreted)
        kernel_layers = [m for m in model.modules() if isinstance(m, gemv_nf4.Gemv4bit)]
        assert len(kernel_layers) == 4 * 7, len(kernel_layers)  # every product of 4 layers
        assert not any(isinstance(m, gemv_nf4.Gemv4bit) for m in model.model.visual.modules())
        shapes = []
        plain = gemv_nf4._launch
        gemv_nf4._launch = lambda x, *a, **k: shapes.append(tuple(x.shape)) or plain(x, *a, **k)
        clip = make_clip(seed=1)
        pixels = 56 * 56 * 4
        ours = ask(loaded, clip, "what colour?", loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=8,
                   max_pixels=pixels)
        assert len(shapes) >= 7 * 28, len(shapes)  # seven decode steps went through it
        assert all(s[:-1] == (1, 1) for s in shapes), set(shapes)  # one token each, never the prefill
        with gemv.stock_linears(model):
            assert not any(isinstance(m, gemv_nf4.Gemv4bit) for m in model.modules())
            stock = ask(loaded, clip, "what colour?", loaded.resolve_prune(PruneConfig(method="none")),
                        max_new_tokens=8,
                        max_pixels=pixels)
        assert ours.tokens == stock.tokens, (ours.tokens, stock.tokens)
        assert sum(isinstance(m, gemv_nf4.Gemv4bit) for m in model.modules()) == len(kernel_layers)
        config = loaded.resolve_prune(PruneConfig(method="sharp", layer=2, ratio=0.3))
        pruned = ask(loaded, clip, "what colour?", config, max_new_tokens=8, max_pixels=pixels)
        with gemv.stock_linears(model):
            stock = ask(loaded, clip, "what colour?", config, max_new_tokens=8, max_pixels=pixels)
        assert pruned.tokens == stock.tokens
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_a_4bit_layer_compiles_into_one_graph():
    """torch.compile(fullgraph=True) raises at any graph break: the compiled decode step must see
    the kernel as one op."""
    out = _interpreted(prelude=QUANTIZE, code="""
        from sharp_cli.models import gemv_nf4
        torch.manual_seed(0)
        layer = quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)))
        assert gemv_nf4.use_gemv_4bit([layer]) == 1
        x = torch.randn(1, 1, 128)
        calls = []
        plain = gemv_nf4._launch
        gemv_nf4._launch = lambda *a, **k: calls.append(1) or plain(*a, **k)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        with torch.no_grad():
            ours = compiled(x)
            state = layer[0].weight.quant_state
            stock = bnb.matmul_4bit(x, layer[0].weight.t(), quant_state=state, bias=layer[0].bias)
        assert calls and (ours - stock).abs().max().item() < 1e-4
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_the_switches(monkeypatch):
    """On by default for CUDA models only (since cuda_check --quant nf4 passed with it, H200
    2026-12-05); SHARP_GEMV_NF4=0 turns it off; SHARP_GEMV=0 turns both kernels off."""
    import torch

    from sharp_cli.models import gemv_nf4

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("SHARP_GEMV", raising=False)
    monkeypatch.delenv("SHARP_GEMV_NF4", raising=False)
    monkeypatch.setattr(gemv_nf4, "INTERPRETED", False)
    assert gemv_nf4.available(cuda) and not gemv_nf4.available(cpu)
    monkeypatch.setenv("SHARP_GEMV_NF4", "0")
    assert not gemv_nf4.available(cuda)
    monkeypatch.setenv("SHARP_GEMV_NF4", "1")
    monkeypatch.setenv("SHARP_GEMV", "0")
    assert not gemv_nf4.available(cuda)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_the_shuffle_lookup_equals_bitsandbytes_on_the_gpu():
    """The GPU path (codes by warp shuffle) and the table lookup against bitsandbytes' own
    dequantization, on CUDA."""
    import bitsandbytes.functional as F
    import torch

    from sharp_cli.models import gemv_nf4

    torch.manual_seed(0)
    for n, k, sizes in [(512, 3584, None), (37, 64 * 11, None), (33, 64 * 19, (16, 16, 4))]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        packed, state = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        exact = x.double() @ F.dequantize_4bit(packed, state).double().T
        for shuffle in (True, False):
            out = torch.full((1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            ours = gemv_nf4.gemv_4bit(x, packed, state, out=out, sizes=sizes, shuffle=shuffle).double()
            assert ((ours - exact).norm() / exact.norm()).item() < 4e-3, (n, k, shuffle)


def test_every_shuffle_reads_the_threads_own_code():
    """Compiled for an H100 (sm_90, no GPU needed): every shuffle's source is one register, loaded by
    the thread itself from code[lane % 16]. Catches a table that a layout conversion moves between
    threads (Triton 3.6 did, with the table shaped like the tile: 1.3-3.1 relative error on an H100
    where the interpreter, which never shuffles, was exact)."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from sharp_cli.models import nf4_kernels

    pointers = ("x_ptr", "w_ptr", "code_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr", "b_ptr", "y_ptr")
    types = ("*bf16", "*i32", "*fp32", "*u8", "*fp32", "*fp32", "*fp32", "*bf16", "*bf16")
    integers = ("n", "row_words", "per_row", "stride_x", "stride_y")
    constants = {"QBLOCK": 64, "NB": 8, "BLOCK_N": 16, "NESTED": True, "BLOCKS2": 256, "HAS_BIAS": False,
                 "SHUFFLE": True}
    signature = {**dict(zip(pointers, types)), **dict.fromkeys(integers, "i32"),
                 **dict.fromkeys(constants, "constexpr")}
    aligned = [(list(signature).index(name),) for name in (*pointers, *integers[1:])]  # as launches see them
    source = ASTSource(fn=nf4_kernels.gemv_4bit, signature=signature, constexprs=constants,
                       attrs={at: [["tt.divisibility", 16]] for at in aligned})
    ptx = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    sources = set(re.findall(r"shfl\.sync\.idx\.b32 %r\d+, (%r\d+),", ptx))
    assert len(re.findall(r"shfl\.sync\.idx\.b32", ptx)) == 8 * 16 * 64 * 2 // 128  # 8 nibbles, 2 tile loops
    assert len(sources) == 1, sources
    lane = re.search(r"mov\.u32 (%r\d+), %laneid;\s+// end inline asm\s+.*?and\.b32\s+(%r\d+), \1, 15;", ptx, re.S)
    assert lane, "no code[lane % 16] index"
    address = re.search(r"mad\.wide\.u32\s+(%rd\d+), " + lane.group(2) + r", 4, %rd\d+;", ptx)
    assert address and re.search(r"ld\.global\.b32 \{ " + sources.pop() + r" \}, \[ " + address.group(1), ptx)


def test_the_gpu_checks_float32_reference_is_the_4bit_layers_own_function():
    """scripts/cuda_check.py judges sharp's 4-bit kernel against float32 layers made from
    bitsandbytes' dequantized weights: each must compute what the 4-bit layer computes (bitsandbytes'
    own float32 forward on the CPU), bias included, in the parent's place."""
    import bitsandbytes as bnb
    import torch

    from scripts.cuda_check import dequantize_4bit_in_place
    from sharp_cli.models import gemv_nf4

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.SiLU(), torch.nn.Linear(64, 128, bias=False))
    for i in (0, 2):
        child = model[i]
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")
        q.support_avx512bf16_for_cpu = False
        model[i] = q
    assert gemv_nf4.use_gemv_4bit([model]) == 2
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = model(x)  # 5 rows: bitsandbytes' own path, never the kernel
        assert dequantize_4bit_in_place(model) == 2
        got = model(x)
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in (model[0], model[2]))
    assert model[0].bias is not None and model[2].bias is None
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()

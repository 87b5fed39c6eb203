"""sharp's matrix-vector kernel (models/gemv.py), run by Triton's CPU interpreter in a subprocess
(the interpreter is chosen when Triton compiles, so it needs its own process): the kernel against
F.linear in float64 on awkward shapes, and whole answers through GemvLinear layers against
transformers' generate() with stock nn.Linear layers."""

from __future__ import annotations

import pytest

from conftest import triton_interpreted

pytest.importorskip("triton")

def test_the_kernel_equals_a_float64_product_on_shapes_that_do_not_fill_a_block():
    out = triton_interpreted("""
        import torch
        from sharp_cli.models import gemv
        torch.manual_seed(0)
        for n, k, bias in [(37, 100, True), (5, 3000, False), (130, 64, True)]:
            w, x = torch.randn(n, k), torch.randn(1, 1, k)
            b = torch.randn(n) if bias else None
            ours = gemv.gemv(x, w, b)
            exact = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
            assert ours.shape == (1, 1, n), ours.shape
            err = (ours.double() - exact).abs().max().item()
            assert err < 1e-4 * exact.abs().max().item(), (n, k, err)
            # bf16 in and out: within one bf16 step (the interpreter truncates where a GPU rounds to
            # nearest) and float32 summing of the exact product
            wb, xb = w.bfloat16(), x.bfloat16()
            bb = b.bfloat16() if bias else None
            ours = gemv.gemv(xb, wb, bb).double()
            exact = torch.nn.functional.linear(xb.double(), wb.double(), bb.double() if bias else None)
            scale = torch.nn.functional.linear(xb.double().abs(), wb.double().abs())  # float32 sums' scale
            assert ((ours - exact).abs() <= exact.abs() * 2 ** -7 + scale * 1e-6).all(), (n, k)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_answers_through_the_kernel_equal_generate_with_stock_linears():
    """Method none through GemvLinear layers (every one-token product in the kernel) gives
    generate()'s tokens; peers.stock_attention swaps back to nn.Linear for generate(); and the
    pruned answer is the one the stock layers give."""
    out = triton_interpreted("""
        import torch
        from conftest import load_tiny, make_clip
        from sharp_cli import engine
        from sharp_cli.answer import ask
        from sharp_cli.models import gemv
        from sharp_cli.peers import stock_attention
        from sharp_cli.prune import PruneConfig

        loaded = load_tiny("qwen2.5-vl")
        swapped = [m for m in loaded.model.modules() if type(m) is gemv.GemvLinear]
        assert len(swapped) == 4 * 7 + 1, len(swapped)  # every product of 4 layers, and the lm_head
        calls = []
        plain = gemv.gemv
        gemv.gemv = lambda *a, **k: calls.append(1) or plain(*a, **k)
        clip = make_clip(seed=1)
        pixels = 56 * 56 * 4
        ours = ask(loaded, clip, "what colour?", loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=10,
                   max_pixels=pixels)
        assert len(calls) >= 9 * 29, len(calls)  # nine decode steps went through it
        inputs = engine.prepare(loaded, clip, "what colour?", pixels)
        with stock_attention(loaded), torch.inference_mode():
            assert not any(type(m) is gemv.GemvLinear for m in loaded.model.modules())
            out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=10)
        assert ours.tokens == out[0, inputs["input_ids"].shape[1]:].tolist(), (ours.tokens, out)
        assert sum(type(m) is gemv.GemvLinear for m in loaded.model.modules()) == len(swapped)
        config = loaded.resolve_prune(PruneConfig(method="sharp", layer=2, ratio=0.3))
        pruned = ask(loaded, clip, "what colour?", config, max_new_tokens=10, max_pixels=pixels)
        with gemv.stock_linears(loaded.model):
            stock = ask(loaded, clip, "what colour?", config, max_new_tokens=10, max_pixels=pixels)
        assert pruned.tokens == stock.tokens
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_a_gemv_layer_compiles_into_one_graph():
    """torch.compile(fullgraph=True) raises at any graph break: the compiled decode step must see the
    kernel as one op (a lookup it could not trace broke the step at every linear on the GPU)."""
    out = triton_interpreted("""
        import torch
        from sharp_cli.models import gemv
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 32)
        assert gemv.use_gemv([layer]) == 1
        x = torch.randn(1, 1, 64)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        with torch.no_grad():
            ours, stock = compiled(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert (ours - stock).abs().max().item() < 1e-4
        print("ok")
    """)
    assert out.strip().endswith("ok")

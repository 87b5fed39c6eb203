"""The vision tower's fused kernels (models/fused_vision.py: rotary embedding, RMSNorm, SiLU * up) against
transformers' own code, on Triton's CPU interpreter in a subprocess (chosen when Triton compiles):
the rotary kernel bit-equal to apply_rotary_pos_emb_vision on the qkv product's strided views in
three dtypes; whole tiny towers of the three Qwen families with the kernels swapped in against the
same towers without them; the paths that must stay stock."""

from __future__ import annotations

import pytest

from conftest import triton_interpreted

pytest.importorskip("triton")


def test_the_rotary_kernel_equals_transformers_bit_for_bit():
    out = triton_interpreted("""
        import torch
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
        from sharp_cli.models import fused_vision as fv
        torch.manual_seed(0)
        stock = qwen.apply_rotary_pos_emb_vision
        stock = getattr(stock, "sharp_original", stock)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            # (rows, heads, head dim): Qwen2.5-VL's 16 x 80 (a half of 40 fills no block), odd counts
            for rows, heads, d in ((7, 16, 80), (5, 3, 10), (1, 1, 4)):
                qkv = (torch.randn(rows, 3 * heads * d) * 3).to(dtype)
                q, k, _ = qkv.reshape(rows, 3, heads, d).permute(1, 0, 2, 3).unbind(0)  # as the module views it
                angles = torch.randn(rows, d // 2) * 20
                cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # float32
                ours, theirs = fv.vision_rotary(q, k, cos, sin), stock(q, k, cos, sin)
                for o, s in zip(ours, theirs, strict=True):
                    assert o.shape == s.shape and o.dtype == s.dtype and o.is_contiguous()
                    assert torch.equal(o, s), (dtype, rows, heads, d, int((o != s).sum()))
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_towers_with_the_kernels_give_the_stock_features():
    """Qwen2-VL's and Qwen3-VL's towers (LayerNorm: the rotary alone is swapped) equal their stock
    selves exactly; Qwen2.5-VL's (RMSNorm too, whose float32 sums run in another order) within a
    bf16 step or two. Each kernel must have run: the launches are counted."""
    out = triton_interpreted("""
        import torch
        from conftest import load_tiny, tower_inputs
        from sharp_cli.models import fused_step, fused_vision as fv, gemv
        launches = {"rotary": 0, "norm": 0, "silu_mul": 0}
        kernel, norm, silu_mul = fv.vision_rotary, fused_step.rms_norm, fused_step.silu_mul
        def counted_rotary(*a):
            launches["rotary"] += 1
            return kernel(*a)
        def counted_norm(*a):
            launches["norm"] += 1
            return norm(*a)
        def counted_silu_mul(*a):
            launches["silu_mul"] += 1
            return silu_mul(*a)
        fv.vision_rotary, fused_step.rms_norm, fused_step.silu_mul = counted_rotary, counted_norm, counted_silu_mul
        for family in ("qwen2-vl", "qwen3-vl", "qwen2.5-vl"):
            visual = load_tiny(family, layers=2).model.model.visual.to(torch.bfloat16)
            blocks = len(visual.blocks)
            norms = 2 * blocks + 1 if family == "qwen2.5-vl" else 0  # each block's two and the merger's
            mlps = blocks if family == "qwen2.5-vl" else 0  # gated SiLU MLPs (the others use GELU)
            kinds = [type(m).__name__ for m in visual.modules() if type(m).__name__.startswith("Fused")]
            assert len(kinds) == blocks + norms + mlps + 1, (family, kinds)  # + the patch embedding
            x, grid = tower_inputs(visual, (2, 10, 14) if family != "qwen3-vl" else (2, 8, 12))
            x = x.to(torch.bfloat16)
            before = dict(launches)
            with torch.inference_mode():
                ours = visual(x, grid_thw=grid).pooler_output
                with fv.stock_modules(visual):
                    stock = visual(x, grid_thw=grid).pooler_output
                with gemv.stock_linears(visual):
                    also_stock = visual(x, grid_thw=grid).pooler_output
            assert launches["rotary"] - before["rotary"] == blocks, (family, launches)
            assert launches["norm"] - before["norm"] == norms, (family, launches)
            assert launches["silu_mul"] - before["silu_mul"] == mlps, (family, launches)
            assert torch.equal(stock, also_stock)
            # The patch embedding's product sums in another order than the convolution (and Qwen2.5-VL's
            # norms too): within a bf16 step or two. The rotary kernel alone is bit-equal (test above).
            torch.testing.assert_close(ours, stock, rtol=2 ** -6, atol=2 ** -6 * float(stock.abs().max()))
        print("ok")
    """, SHARP_FUSED_VISION="1")
    assert out.strip().endswith("ok")


def test_the_switch_and_the_stock_paths(monkeypatch):
    """Off by default (on with SHARP_FUSED_VISION=1, CUDA only); outside a fused attention module's
    call, on the CPU without the interpreter and on shapes it does not take, the dispatcher calls
    transformers' function and no kernel."""
    import torch

    from sharp_cli.models import fused_step
    from sharp_cli.models import fused_vision as fv
    from sharp_cli.models.random_init import build_random, tiny_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(fv.SWITCH, raising=False)
    monkeypatch.setattr(fused_step, "INTERPRETED", False)
    assert fv.available(cuda) and not fv.available(cpu)  # on by default on CUDA
    monkeypatch.setenv(fv.SWITCH, "0")
    assert not fv.available(cuda)
    monkeypatch.setenv(fv.SWITCH, "1")
    monkeypatch.setenv(fused_step.SWITCH, "0")  # the kernels' common switch turns both off
    assert not fv.available(cuda)

    def refuse(*a, **k):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(fv, "vision_rotary", refuse)
    monkeypatch.setattr(fused_step, "rms_norm", refuse)
    monkeypatch.setattr(fused_step, "silu_mul", refuse)
    model, _ = build_random(tiny_config("qwen2.5-vl", layers=2), dtype="bfloat16")
    visual = model.model.visual
    assert fv.use_fused_vision(visual) == 10 and fv.use_fused_vision(visual) == 0  # 2 blocks' 4, merger norm, patches
    module = __import__(type(visual.blocks[0].attn).__module__, fromlist=["x"])
    q = k = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    cos = sin = torch.randn(4, 8)
    stock = module.apply_rotary_pos_emb_vision.sharp_original(q, k, cos, sin)
    for a, b in zip(module.apply_rotary_pos_emb_vision(q, k, cos, sin), stock, strict=True):  # outside attention
        assert torch.equal(a, b)
    from conftest import tower_inputs

    x, grid = tower_inputs(visual)
    with torch.inference_mode():
        ours = visual(x.to(torch.bfloat16), grid_thw=grid).pooler_output  # the CPU: stock code throughout
        with fv.stock_modules(visual):
            theirs = visual(x.to(torch.bfloat16), grid_thw=grid).pooler_output
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_the_patch_embedding_as_a_product_equals_the_convolution(family, monkeypatch):
    """The tower's Conv3d (kernel = stride) against its swapped product: float32 to the sums' order,
    Qwen3-VL's bias included; a convolution that is no product (stride != kernel) stays stock."""
    import torch

    from sharp_cli.models import fused_step
    from sharp_cli.models import fused_vision as fv
    from sharp_cli.models.random_init import build_random, tiny_config

    monkeypatch.setattr(fused_step, "INTERPRETED", True)  # served() on the CPU; the product launches no kernel
    model, _ = build_random(tiny_config(family, layers=1), dtype="float32")
    embed = model.model.visual.patch_embed
    with torch.no_grad():
        embed.proj.weight.normal_()
        if embed.proj.bias is not None:
            embed.proj.bias.normal_(std=3.0)
        x = torch.randn(37, embed.proj.weight[0].numel())
        stock = embed(x)
        fv.use_fused_vision(model.model.visual)
        assert type(embed).__name__.startswith("Fused")
        torch.testing.assert_close(embed(x), stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))
    strided, _ = build_random(tiny_config(family, layers=1), dtype="float32")
    strided.model.visual.patch_embed.proj.stride = (1, 1, 1)
    fv.use_fused_vision(strided.model.visual)
    assert not type(strided.model.visual.patch_embed).__name__.startswith("Fused")

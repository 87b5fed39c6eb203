"""The vision MLPs padded to aligned widths, gate and up as one product: the stock tower's features."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from conftest import tower_inputs
from sharp_cli import loading
from sharp_cli.models import adapter_for, vision_mlp
from sharp_cli.models.random_init import build_random, tiny_config


def calls_of(modules):
    """A list that grows by one each time one of `modules` runs its own forward."""
    calls = []
    for m in modules:
        m.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family, switch, fused",
                         [("qwen2.5-vl", "1", 2), ("qwen2.5-vl", None, 0), ("qwen3-vl", "1", 0)])
def test_sharp_tower_gives_the_stock_towers_features(family, switch, fused, monkeypatch):
    """What loading.ready makes of a tower (packed attention; Qwen2.5-VL's gated MLPs at the 7B's
    width 3,420 padded to 3,456, gate and up as one product with SHARP_VISION_FUSED_MLP=1, two by
    default) against an untouched copy, fp32. Qwen3-VL's vision MLP is not gated: nothing is fused
    there, and its features stay the stock's."""
    if switch is None:
        monkeypatch.delenv(vision_mlp.SWITCH, raising=False)
    else:
        monkeypatch.setenv(vision_mlp.SWITCH, switch)
    config = tiny_config(family)
    if family == "qwen2.5-vl":
        config.vision_config.intermediate_size = 3420
    model, processor = build_random(config, dtype="float32")
    stock = copy.deepcopy(model.model.visual)
    loading.ready(
        loading.Loaded(model, processor, adapter_for(config), "tiny", torch.device("cpu"), torch.float32, "none", True)
    )
    visual = model.model.visual
    mlps, stock_mlps = [b.mlp for b in visual.blocks], [b.mlp for b in stock.blocks]
    assert sum(type(m).__name__ == f"Fused{type(s).__name__}" for m, s in zip(mlps, stock_mlps)) == fused
    if family == "qwen2.5-vl":  # padded either way; one allocation only when fused
        assert all(m.gate_proj.out_features == 3456 for m in mlps)
        assert all(bool(vision_mlp.stacked(m.gate_proj, m.up_proj)) == bool(fused) for m in mlps)
    gate_calls = calls_of([m.gate_proj for m in mlps if hasattr(m, "gate_proj")])
    x, grid = tower_inputs(visual)
    with torch.inference_mode():
        ours, ref = visual(x, grid_thw=grid), stock(x, grid_thw=grid)
    if fused:
        assert not gate_calls  # one product for gate and up: gate_proj never ran on its own
    for key in ("pooler_output", "last_hidden_state"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.get("deepstack_features") or [], ref.get("deepstack_features") or []):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_vision_mlps_give_the_same_output_and_unpad_for_the_stock_rows():
    """Zero-padding the gated MLPs (Qwen2.5-VL's 3,420 -> 3,456) must not change the encoder's
    output, and unpadded() must hand the stock rows the original shapes and values."""
    model, processor = build_random(tiny_config("qwen2.5-vl"), dtype="float32")
    visual = model.model.visual
    mlp = visual.blocks[0].mlp
    original = mlp.down_proj.weight.clone()
    x = torch.randn(64, visual.config.hidden_size)
    with torch.inference_mode():
        before = mlp(x)
        assert vision_mlp.pad_gated_mlps(visual, align=48) == len(visual.blocks)  # 64 -> 96
        assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == mlp.down_proj.weight.shape[1] == 96
        torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
        with vision_mlp.unpadded(visual):
            assert mlp.down_proj.weight.shape[1] == mlp.gate_proj.out_features == 64
            assert mlp.down_proj.weight.is_contiguous()
            torch.testing.assert_close(mlp.down_proj.weight, original, rtol=0, atol=0)
            torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
        assert mlp.down_proj.weight.shape[1] == 96 and mlp.down_proj.in_features == 96
        torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)  # padded again, exactly
        assert not mlp.down_proj.weight[:, 64:].any() and not mlp.gate_proj.bias[64:].any()
        assert vision_mlp.pad_gated_mlps(visual, align=48) == 0  # already aligned: nothing to do


def test_fusing_rewrites_each_mlp_once_and_unpadded_separates_gate_and_up():
    """Gate and up end in one (2W, D) allocation and the old weights are gone (no second copy of
    the tower held); unpadded() gives each its own stock-width tensor, and the fused forward then
    runs the stock products (as after a .to(), which separates them too)."""
    model, _ = build_random(tiny_config("qwen2.5-vl"), dtype="float32")
    visual = model.model.visual
    mlp = visual.blocks[0].mlp
    old = [weakref.ref(p) for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.gate_proj.bias)]
    x = torch.randn(50, visual.config.hidden_size)
    with torch.inference_mode():
        before = mlp(x)
    assert vision_mlp.pad_gated_mlps(visual, align=48) == len(visual.blocks)  # 64 -> 96, fused
    assert all(ref() is None for ref in old)
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
    assert gate.untyped_storage().nbytes() == 2 * 96 * visual.config.hidden_size * gate.element_size()
    weight, bias = vision_mlp.stacked(mlp.gate_proj, mlp.up_proj)
    torch.testing.assert_close(weight, torch.cat([gate, up]), rtol=0, atol=0)
    torch.testing.assert_close(bias, torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]), rtol=0, atol=0)
    names = {f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")}
    assert set(mlp.state_dict()) == names  # the same parameters under the same names
    gate_calls = calls_of([mlp.gate_proj])
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
        assert not gate_calls
        with vision_mlp.unpadded(visual):
            assert vision_mlp.stacked(mlp.gate_proj, mlp.up_proj) is None
            assert mlp.gate_proj.weight.untyped_storage().nbytes() == 64 * visual.config.hidden_size * 4
            torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
        assert len(gate_calls) == 1  # the stock forward ran its own products
        assert vision_mlp.stacked(mlp.gate_proj, mlp.up_proj) is not None  # fused again
        torch.testing.assert_close(mlp(x), before, rtol=1e-6, atol=1e-6)
        assert len(gate_calls) == 1
        visual.to(torch.float64)
        assert vision_mlp.stacked(mlp.gate_proj, mlp.up_proj) is None
        torch.testing.assert_close(mlp(x.double()).float(), before, rtol=1e-5, atol=1e-5)
        assert len(gate_calls) == 2


def test_stock_rows_run_the_stock_mlp_class(monkeypatch):
    """peers.stock_attention hands the stock rows transformers' own MLP class and separate weights."""
    from sharp_cli import peers

    monkeypatch.setenv(vision_mlp.SWITCH, "1")
    config = tiny_config("qwen2.5-vl")
    model, processor = build_random(config, dtype="float32")
    tiny = loading.ready(
        loading.Loaded(model, processor, adapter_for(config), "tiny", torch.device("cpu"), torch.float32, "none", True)
    )
    mlp = tiny.model.model.visual.blocks[0].mlp
    fused = type(mlp)
    assert fused.__name__ == "FusedQwen2_5_VLMLP"
    with peers.stock_attention(tiny):
        assert type(mlp) is fused.stock_class and vision_mlp.stacked(mlp.gate_proj, mlp.up_proj) is None
    assert type(mlp) is fused and vision_mlp.stacked(mlp.gate_proj, mlp.up_proj) is not None

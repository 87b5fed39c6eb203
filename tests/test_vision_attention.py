"""The batched packed attention of Qwen vision towers equals transformers' per-window SDPA loop."""

from __future__ import annotations

import pytest
import torch

from conftest import load_tiny, make_clip
from sharp_cli import engine
from sharp_cli.models import vision_attention


def test_packed_attention_equals_per_chunk_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 8) for _ in range(3))
    cu = torch.tensor([0, 8, 16, 19, 27, 35, 40])  # lengths 8, 8, 3, 8, 8, 5
    out, _ = vision_attention.packed_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.3)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                      scale=0.3)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2).transpose(1, 2)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_vision_tower_output_is_unchanged(family):
    loaded = load_tiny(family)
    visual = loaded.model.model.visual
    assert visual.config._attn_implementation == vision_attention.NAME
    inputs = engine.prepare(loaded, make_clip(frames=8, height=112, width=112), "what?", 112 * 112)
    with torch.inference_mode():
        ours = engine.encode(loaded, inputs)[0].inputs_embeds
        visual.config._attn_implementation = "sdpa"
        stock = engine.encode(loaded, inputs)[0].inputs_embeds
    visual.config._attn_implementation = vision_attention.NAME
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_padded_vision_mlps_give_the_same_output_and_unpad_for_the_stock_rows():
    """Zero-padding the gated MLPs (Qwen2.5-VL's 3,420 -> 3,456) must not change the encoder's
    output, and unpadded() must hand the stock rows the original shapes and values."""
    from sharp_cli.models import vision_mlp
    from sharp_cli.models.random_init import build_random, tiny_config

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


def test_stock_attention_restores_cudnn_and_the_padded_widths(tiny):
    from sharp_cli import peers

    visual = tiny.model.model.visual
    torch.backends.cuda.enable_cudnn_sdp(False)
    widths = [b.mlp.down_proj.in_features for b in visual.blocks]
    try:
        with peers.stock_attention(tiny):
            assert torch.backends.cuda.cudnn_sdp_enabled()
            assert visual.config._attn_implementation == "sdpa"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert visual.config._attn_implementation == vision_attention.NAME
        assert [b.mlp.down_proj.in_features for b in visual.blocks] == widths
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_compiled_vision_blocks_give_the_eager_features_and_leave_the_model_plain():
    """--compile swaps compiled blocks in for the encoder phase only: same features for two video
    shapes (the second compiles with symbolic sizes), the plain blocks back in the model after."""
    loaded = load_tiny("qwen2.5-vl")
    blocks = loaded.model.model.visual.blocks
    plain = list(blocks)
    shapes = [engine.prepare(loaded, make_clip(frames=f, height=112, width=112), "what?", 112 * 112) for f in (8, 4)]
    eager = [engine.encode(loaded, inputs)[0].inputs_embeds for inputs in shapes]
    loaded.use_compile(True)
    for inputs, reference in zip(shapes, eager):
        torch.testing.assert_close(engine.encode(loaded, inputs)[0].inputs_embeds, reference, rtol=1e-5, atol=1e-5)
    assert list(blocks) == plain and loaded.compiled

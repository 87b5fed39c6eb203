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
    torch.testing.assert_close(out, per_chunk(q, k, v, cu, 0.3))


def per_chunk(q, k, v, cu, scale):
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                       scale=scale)
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2).transpose(1, 2)


def test_layout_is_read_once_per_tensor_and_equal_frames_need_no_gather(monkeypatch):
    """A tower hands every block the same cu_seqlens: its host read happens once (the plan lives on
    the tensor), and frames of one length tiling the sequence are a reshape (no row index)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 8) for _ in range(3))
    cu = torch.tensor([0, 8, 16, 16, 24])  # three frames of 8 (and an empty chunk, as unique_consecutive leaves none)
    out, _ = vision_attention.packed_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.3)
    torch.testing.assert_close(out, per_chunk(q, k, v, cu, 0.3))
    assert vision_attention.window_plan(cu, q.device) == [(8, 3, None)]

    def refuse(*args, **kwargs):
        raise AssertionError("cu_seqlens read again")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch, "equal", refuse)
    again, _ = vision_attention.packed_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.3)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


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

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

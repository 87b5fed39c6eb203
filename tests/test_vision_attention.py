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


def test_the_varlen_kernel_gets_the_packed_rows_and_the_nonempty_bounds(monkeypatch):
    """With SHARP_VISION_VARLEN's kernel (CUDA only) in place, a block is one call handed (T, H, d)
    rows, int32 bounds without the empty chunks and the longest chunk; a reference kernel made of
    per-chunk SDPA then gives the per-chunk answer. Without the switch, no call."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 8) for _ in range(3))
    cu = torch.tensor([0, 8, 8, 16, 19, 27, 35, 40], dtype=torch.int32)  # an empty chunk, lengths 8, 8, 3, 8, 8, 5
    calls = []

    def reference(query, key, value, cu_q, cu_k, max_q, max_k):
        calls.append((tuple(query.shape), cu_q.dtype, cu_q.tolist(), max_q))
        assert cu_k is cu_q and max_k == max_q
        rows = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  (T, H, d) -> (1, H, T, d)
        return per_chunk(rows(query), rows(key), rows(value), cu_q, None)[0]  # (T, H, d)

    monkeypatch.setattr(vision_attention, "varlen_kernel", lambda query: reference)
    out, _ = vision_attention.packed_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                               scaling=8 ** -0.5)
    assert calls == [((40, 4, 8), torch.int32, [0, 8, 16, 19, 27, 35, 40], 8)]
    torch.testing.assert_close(out, per_chunk(q, k, v, cu, None))
    calls.clear()
    vision_attention.packed_attention(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=0.3)
    assert calls == []  # another scale than the kernel's: the grouped SDPA path


def test_the_varlen_switch_is_on_by_default_and_cuda_only(monkeypatch):
    from types import SimpleNamespace

    from torch.nn.attention.varlen import varlen_attn

    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # what varlen_kernel reads of a query
    monkeypatch.delenv(vision_attention.VARLEN_SWITCH, raising=False)
    assert vision_attention.varlen_kernel(cuda) is varlen_attn
    monkeypatch.setenv(vision_attention.VARLEN_SWITCH, "0")
    assert vision_attention.varlen_kernel(cuda) is None
    monkeypatch.setenv(vision_attention.VARLEN_SWITCH, "1")
    assert vision_attention.varlen_kernel(SimpleNamespace(is_cuda=True, dtype=torch.float32)) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # --compile's blocks: the grouped path
    assert vision_attention.varlen_kernel(cuda) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert vision_attention.varlen_kernel(cuda) is varlen_attn
    assert vision_attention.varlen_kernel(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)) is None  # the CPU

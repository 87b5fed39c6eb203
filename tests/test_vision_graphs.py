"""The vision tower's per-shape cache (CUDA graphs on a GPU): the stock features, a bounded cache,
and a captured region that reads nothing back to the host."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from conftest import load_tiny, make_clip, tower_inputs
from sharp_cli import engine
from sharp_cli.models import vision_graphs
from sharp_cli.models.vision_graphs import VisionGraphs

HOST_READS = (
    "tolist",
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "cpu",
    "numpy",
    "unique_consecutive",
    "repeat_interleave",
)


@contextmanager
def no_host_reads(monkeypatch):
    """Every way a tensor's values reach Python (a device sync on CUDA, an error in graph capture) fails."""

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read in the captured region: {name}")

        return read

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        for name in ("equal", "unique_consecutive", "repeat_interleave", "nonzero"):
            m.setattr(torch, name, refuse(name))
        yield


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_cached_layout_gives_the_stock_features_with_no_host_reads(family, monkeypatch):
    """What a graph captures: the tower's forward given the shape's cached layout. It must give the
    stock features and read nothing back (the stock forward, without the layout, does)."""
    visual = load_tiny(family).model.model.visual
    x, grid = tower_inputs(visual, (2, 10, 14) if family != "qwen3-vl" else (2, 8, 12))
    graphs = VisionGraphs(visual)
    with torch.inference_mode():
        ref = visual(x, grid_thw=grid)
        first = graphs(x, grid_thw=grid)  # layout and packed attention's window plans made here
        (entry,) = graphs.entries.values()
        with no_host_reads(monkeypatch):
            replayed = visual(x, grid_thw=grid, **entry.kwargs)
        with pytest.raises(AssertionError, match="host read"), no_host_reads(monkeypatch):
            visual(x, grid_thw=grid)
    for out in (first, replayed):
        for a, b in zip(vision_graphs._tensors(out), vision_graphs._tensors(ref), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphs.counts == {"captures": 0, "replays": 0, "eager": 1}  # no capture on a CPU


def test_shape_cache_evicts_the_least_recently_used():
    visual = load_tiny("qwen2.5-vl").model.model.visual
    graphs = VisionGraphs(visual, shapes=2)
    grids = [(2, 10, 14), (2, 8, 8), (2, 10, 14), (4, 8, 12)]  # A, B, A, C: B is the one to go
    with torch.inference_mode():
        for grid in grids:
            x, g = tower_inputs(visual, grid)
            torch.testing.assert_close(
                graphs(x, grid_thw=g).pooler_output, visual(x, grid_thw=g).pooler_output, rtol=0, atol=0
            )
    assert [key[0] for key in graphs.entries] == [(2, 10, 14), (4, 8, 12)]
    assert graphs.counts["eager"] == 4


class FakeGraph:
    """A CUDA graph's contract on the CPU: replay() recomputes from the static input into the
    static outputs, in place."""

    def __init__(self, run, out):
        self.run, self.out, self.replays = run, out, 0

    def replay(self):
        self.replays += 1
        for static, new in zip(vision_graphs._tensors(self.out), vision_graphs._tensors(self.run()), strict=True):
            static.copy_(new)


def test_capture_path_replays_copies_out_and_falls_back(monkeypatch):
    """With capture faked on the CPU: the first call captures, later calls of the shape replay; the
    features handed out are copies (a later replay must not change them); moved weights mean a new
    capture; a capture that raises leaves the shape eager with the warm-up's features."""
    from sharp_cli.prune import graphs as prune_graphs

    loaded = load_tiny("qwen2.5-vl")
    visual = loaded.model.model.visual
    captured = []

    def fake_capture(warm_up, run):
        warm_up()
        out = run()
        captured.append(FakeGraph(run, out))
        return captured[-1], out

    monkeypatch.setattr(prune_graphs, "capture", fake_capture)
    monkeypatch.setattr(VisionGraphs, "_graphs_on", lambda self, x: torch.is_inference_mode_enabled())
    graphs = VisionGraphs(visual)
    (x1, grid), (x2, _) = tower_inputs(visual, seed=1), tower_inputs(visual, seed=2)
    with torch.inference_mode():
        ref1, ref2 = (visual(x, grid_thw=grid).pooler_output for x in (x1, x2))
        out1 = graphs(x1, grid_thw=grid).pooler_output
        out2 = graphs(x2, grid_thw=grid).pooler_output
        torch.testing.assert_close(out1, ref1, rtol=0, atol=0)  # not overwritten by the second replay
        torch.testing.assert_close(out2, ref2, rtol=0, atol=0)
        assert graphs.counts == {"captures": 1, "replays": 1, "eager": 0} and captured[0].replays == 2
        gate = visual.blocks[0].mlp.gate_proj
        gate.weight.data = gate.weight.data.clone()  # the weights move: the graph would read freed memory
        torch.testing.assert_close(graphs(x1, grid_thw=grid).pooler_output, ref1, rtol=1e-5, atol=1e-5)
        assert graphs.counts["captures"] == 2

        def failing_capture(warm_up, run):
            warm_up()
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(prune_graphs, "capture", failing_capture)
        x3, grid3 = tower_inputs(visual, (2, 8, 8))
        ref3 = visual(x3, grid_thw=grid3).pooler_output
        for _ in range(2):  # the warm-up's features, then eager with the cached layout
            torch.testing.assert_close(graphs(x3, grid_thw=grid3).pooler_output, ref3, rtol=0, atol=0)
        assert len(graphs.failed) == 1 and "not permitted" in next(iter(graphs.failed.values()))
        assert graphs.counts["eager"] == 1 and graphs.counts["captures"] == 2


def test_off_by_default_cuda_only_and_routed_through_engine_encode(monkeypatch):
    """SHARP_VISION_GRAPHS=1 turns it on for CUDA models only; engine.encode runs the tower through
    it (same features) and leaves the tower's own forward in place afterwards."""
    monkeypatch.delenv(vision_graphs.SWITCH, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert vision_graphs.available(cuda) is (vision_graphs.DEFAULT == "1") and not vision_graphs.available(cpu)
    monkeypatch.setenv(vision_graphs.SWITCH, "1")
    assert vision_graphs.available(cuda) and not vision_graphs.available(cpu)
    loaded = load_tiny("qwen3-vl")
    assert loaded.vision_graphs is None  # a CPU model
    inputs = engine.prepare(loaded, make_clip(frames=8, height=112, width=112), "what?", 112 * 112)
    plain = engine.encode(loaded, inputs)[0]
    loaded.vision_graphs = VisionGraphs(loaded.model.model.visual)
    cached = engine.encode(loaded, inputs)[0]
    assert loaded.vision_graphs.counts["eager"] == 1 and "forward" not in vars(loaded.model.model.visual)
    torch.testing.assert_close(cached.inputs_embeds, plain.inputs_embeds, rtol=0, atol=0)
    for a, b in zip(cached.extra["deepstack_visual_embeds"], plain.extra["deepstack_visual_embeds"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_capture_first_brings_buffers_to_the_input_device():
    """A buffer left on another device (the vision rotary's inv_freq on the CPU of a CUDA tower) makes
    the forward copy it over on every call, which capture refuses: _buffers_to moves it first."""
    from sharp_cli.models.random_init import build_random, tiny_config

    model, _ = build_random(tiny_config("qwen2.5-vl"), dtype="float32")
    visual = model.model.visual
    buffers = [name for name, _ in visual.named_buffers()]
    assert any(name.endswith("inv_freq") for name in buffers)
    assert vision_graphs._buffers_to(visual, torch.device("meta")) == len(buffers)  # "meta": another device
    assert all(b.device.type == "meta" for b in visual.buffers())
    assert vision_graphs._buffers_to(visual, torch.device("meta")) == 0


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_the_layout_lives_on_the_patches_device(family):
    """transformers' export helper leaves Qwen2.5-VL's window_index on the CPU whatever grid_thw's
    device (`torch.arange` without one), and indexing the GPU's patches with it is a copy that capture
    refuses (an H100's capture failed so): every layout tensor goes to the patches' device."""
    visual = load_tiny(family).model.model.visual
    _, grid = tower_inputs(visual, (2, 10, 14) if family != "qwen3-vl" else (2, 8, 12))
    found = vision_graphs.layout(visual, grid, torch.device("meta"))  # "meta": another device than grid's
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    assert tensors and all(v.device.type == "meta" for v in tensors.values()), {k: v.device for k, v in tensors.items()}
    if family == "qwen2.5-vl":
        assert "window_index" in tensors

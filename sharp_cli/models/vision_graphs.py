"""A Qwen vision tower replayed from one CUDA graph per input shape (off unless SHARP_VISION_GRAPHS=1).

Why: eager, the tower is a few hundred kernel launches per block plus host work between them: the
forward reads grid_thw back to build rotary positions, window order and (Qwen3-VL) position-embedding
interpolation, and packed attention reads each cu_seqlens back to group windows by length. Where the
kernels are short (few frames, small frames) the GPU waits on that; a graph replays the launches
with no Python and no host reads in between. Where kernels are long (32 frames: ~25k patches, ms per
GEMM) it buys little: research/vision_check.py times both, and DEFAULT flips to "1" only if it pays.

Layout outside, tower inside. A host read inside torch.cuda.graph capture is an error, and what it
read would be frozen into the graph anyway, so everything that depends on grid_thw is computed once
per shape, outside the graph:
- the tower's own layout tensors (rotary position ids, cu_seqlens and max_seqlen, Qwen2.5-VL's window
  index and window cu_seqlens, Qwen3-VL's interpolation indices and weights), by transformers' export
  helper (`precompute_export_inputs`). The tower's get_vision_* helpers pop them from its keyword
  arguments instead of computing them: transformers' extension point for graph capture and export,
  matched to the tower by the installed transformers itself, so no modelling code is copied here;
- packed attention's window groups (vision_attention.window_plan), made by the warm-up call before
  capture and kept on those cu_seqlens tensors.
The captured region is then the whole forward with that layout: patch embedding, rotary embedding,
every block, the mergers (DeepStack's too), with nothing read back (tests/test_vision_graphs.py runs
it with host reads patched to fail).

Per shape key (grid_thw, input shape, dtype, device): a static input the pixels are copied into,
the graph, and its static outputs, cloned on every replay (the next replay overwrites them, and
callers keep features: the video cache). Captured on the shape's first use: the warm-up call gives
the eager features, the capture follows, and one replay is checked against the warm-up's features;
a capture that raises or replays other features leaves that shape eager (with the cached layout)
for the process. At most `shapes` shapes are kept, least recently used first out; graphs allocate
from the process's one graph pool (prune/graphs.py: run one at a time, outputs copied out). The
graph reads the weights at their addresses of capture time, so a shape whose tower parameters moved
since (vision_mlp.unpadded for the stock rows, a `.to()`) is captured again.

On a CPU, with capture off, or outside inference mode, the same cache serves the layout alone: the eager
tower without its per-call host work. Keyword arguments other than the pixels, grid_thw and
`PASSED` (hidden states or attentions asked for) go to the stock forward untouched. Not combined with `--compile`
(Loaded.vision_context picks the compiled blocks then).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager

SWITCH = "SHARP_VISION_GRAPHS"  # =1: sharp's encoder phase replays the tower from CUDA graphs (loading.ready)
DEFAULT = "0"  # becomes "1" once research/vision_check.py shows the graphed tower faster on the GPU
SHAPES = 4  # captured shapes kept: a served mix of a few video sizes, bounded memory
PASSED = {"return_dict"}  # keyword arguments that change no kernel (Qwen3-VL passes return_dict=True)
MAX_RELATIVE_DIFF = 1e-2  # a replay further than this (max |diff| / max |eager|) from the warm-up is wrong


def available(device) -> bool:
    """Whether loading.ready should give the model vision graphs (CUDA, switched on)."""
    return os.environ.get(SWITCH, DEFAULT) == "1" and device.type == "cuda"


def layout(visual, grid_thw, device=None) -> dict | None:
    """The keyword arguments that stand in for the tower's grid_thw-driven work (module docstring):
    tensors on `device` (default grid_thw's) and ints; None where this transformers has no export
    helper. Moved because the helper leaves some on the CPU whatever grid_thw's device (Qwen2.5-VL's
    window_index: `torch.arange` without a device in transformers 5.25), and indexing the GPU's
    patches with it is a host-to-device copy, which graph capture refuses (an H100 did)."""
    try:
        from transformers.exporters.utils import precompute_export_inputs
    except ImportError:
        return None
    inputs = {"grid_thw": grid_thw}
    precompute_export_inputs(visual, inputs)
    inputs.pop("grid_thw")
    device = grid_thw.device if device is None else device
    return {k: v.to(device) if hasattr(v, "to") and hasattr(v, "device") else v for k, v in inputs.items()}


class _Shape:
    """One shape's layout and, once captured, its graph, static input and static outputs."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self.graph = self.static_in = self.static_out = self.weights = None


class VisionGraphs:
    def __init__(self, visual, shapes: int = SHAPES, capture: bool = True):
        self.visual = visual
        self.shapes = shapes
        self.capture = capture  # False: the layout cache alone
        self.entries: OrderedDict = OrderedDict()  # key -> _Shape, least recently used first
        self.failed: dict = {}  # key -> why its capture failed: eager with the cached layout from then on
        self.counts = {"captures": 0, "replays": 0, "eager": 0}
        self._forward = None  # the tower's own forward while active

    @contextmanager
    def active(self):
        """The tower's forward is this object for the duration (sharp's encoder phase), its own after."""
        own = vars(self.visual).get("forward")  # an instance forward someone else set, kept underneath
        self._forward = own if own is not None else type(self.visual).forward.__get__(self.visual)
        self.visual.forward = self
        try:
            yield self
        finally:
            if own is not None:
                self.visual.forward = own
            else:
                del self.visual.forward
            self._forward = None

    def __call__(self, hidden_states, grid_thw=None, **kwargs):
        """The tower's forward: hidden_states (patches, C * T * P * P) pixels, grid_thw (videos, 3)."""
        forward = self._forward or type(self.visual).forward.__get__(self.visual)
        if grid_thw is None or not set(kwargs) <= PASSED:
            return forward(hidden_states, grid_thw=grid_thw, **kwargs)
        key = (
            tuple(grid_thw.reshape(-1).tolist()),
            tuple(hidden_states.shape),
            hidden_states.dtype,
            hidden_states.device,
            tuple(sorted(kwargs.items())),
        )
        entry = self.entries.pop(key, None)
        if entry is None:
            found = layout(self.visual, grid_thw, hidden_states.device)
            if found is None:
                return forward(hidden_states, grid_thw=grid_thw, **kwargs)
            entry = _Shape({**found, **kwargs})
            while len(self.entries) >= self.shapes:
                self.entries.popitem(last=False)  # its graph and buffers go with it
        self.entries[key] = entry  # most recently used
        graphs = self._graphs_on(hidden_states)
        if entry.graph is not None and entry.weights != self._weights():
            entry.graph = entry.static_in = entry.static_out = None  # stale addresses: capture again
        if graphs and entry.graph is not None:
            entry.static_in.copy_(hidden_states)
            entry.graph.replay()
            self.counts["replays"] += 1
            return _cloned(entry.static_out)
        if graphs and key not in self.failed:
            out = self._capture(key, entry, forward, hidden_states, grid_thw)
            if out is not None:
                return out
        self.counts["eager"] += 1
        return forward(hidden_states, grid_thw=grid_thw, **entry.kwargs)

    def _graphs_on(self, hidden_states) -> bool:
        """Capture and replay here? CUDA, and inference mode only: the static buffers are inference
        tensors, and a graph records no autograd."""
        import torch

        return self.capture and hidden_states.is_cuda and torch.is_inference_mode_enabled()

    def _capture(self, key, entry: _Shape, forward, hidden_states, grid_thw):
        """The shape's features, capturing its graph on the way; None when even the warm-up failed."""
        import torch

        from sharp_cli.prune.graphs import capture

        static_in = hidden_states.clone()
        warm: dict = {}
        _buffers_to(self.visual, hidden_states.device)

        def run():
            return forward(static_in, grid_thw=grid_thw, **entry.kwargs)

        try:
            graph, static_out = capture(lambda: warm.setdefault("out", run()), run)
            graph.replay()
        except Exception as exc:  # noqa: BLE001 - a kernel that syncs with the host: this shape runs eagerly
            if hidden_states.is_cuda:
                torch.cuda.synchronize()
            self._fail(key, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            return warm.get("out")
        diff = _relative_diff(static_out, warm["out"])
        if diff > MAX_RELATIVE_DIFF:
            self._fail(key, f"replay differs from eager by {diff:.3g} (relative)")
            return warm["out"]
        entry.graph, entry.static_in, entry.static_out, entry.weights = graph, static_in, static_out, self._weights()
        self.counts["captures"] += 1
        return _cloned(static_out)

    def _fail(self, key, reason: str) -> None:
        if len(self.failed) > 64:  # shapes seen over a long serve: forget old failures, never grow
            self.failed.clear()
        self.failed[key] = reason

    def _weights(self) -> tuple:
        """Where the tower's parameters are and their shapes: what a graph read at capture (~0.1 ms
        for 400 tensors). The shape too, because a freed weight's address can be handed to a new one
        of another shape (vision_mlp.unpadded's stock-width copies on the CPU allocator)."""
        return tuple((p.data_ptr(), tuple(p.shape)) for p in self.visual.parameters())


def _tensors(out) -> list:
    """The tensors of a tower output (ModelOutput, tuple or list of them, DeepStack's list inside)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for v in values for t in _tensors(v)]


def _cloned(out):
    """out with every tensor copied (the same structure: ModelOutput, tuple, list)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict of its non-None fields
        return type(out)(**{k: _cloned(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_cloned(v) for v in out)
    return out


def _buffers_to(visual, device) -> int:
    """Moves the tower's buffers that live elsewhere (the vision rotary's inv_freq stayed on the CPU
    of a CUDA tower: its forward's `inv_freq.to(x.device)` is then a host-to-device copy every call,
    which graph capture refuses, as on an H200 on 2026-12-05) to `device`; returns how many moved."""
    moved = 0
    for module in visual.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
                moved += 1
    return moved


def _relative_diff(out, reference) -> float:
    """max |out - reference| / max |reference| over all their tensors (inf if they do not match up)."""
    a, b = _tensors(out), _tensors(reference)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    diff = max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(y.float().abs().max()) for y in b if y.numel()), default=0.0)
    return diff / scale if scale else diff

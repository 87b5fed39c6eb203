"""Regional compilation of the vision tower (`--compile`): torch.compile one block, not the tower.

Every block runs the same code and holds no index of its own, so inductor compiles it once and the
other blocks reuse it (their weights are inputs of the compiled graph, not constants of it). What it
buys on an H200 (research/results/h200-decode-profiles-compile.log): RMSNorm, rotary embedding, the
activation and the residual adds become a few fused kernels, the MLP products aligned ones, and the
encoder takes 113 ms instead of 239 ms for 32 frames of Qwen2.5-VL-7B; the first call compiles
(14.5 s). (The decoder layers index their cache by layer number, so they are compiled as one decode
step instead: decode.compiled.)

The compiled wrappers are swapped into the model's ModuleList only while sharp's encoder phase runs
(`with stack.active():`), so the stock transformers rows of `sharp bench` see the plain modules.
"""

from __future__ import annotations

from contextlib import contextmanager


class CompiledStack:
    def __init__(self, layers, dynamic: bool | None):
        import torch

        self.layers = layers  # the model's ModuleList
        self.originals = list(layers)
        # dynamic=None: static shapes first, symbolic once a second video shape shows up.
        self.wrappers = [torch.compile(layer, dynamic=dynamic) for layer in self.originals]

    @contextmanager
    def active(self):
        for i, wrapper in enumerate(self.wrappers):
            self.layers[i] = wrapper
        try:
            yield
        finally:
            for i, layer in enumerate(self.originals):
                self.layers[i] = layer


def vision_blocks(model):
    """The repeated blocks of a Qwen vision tower (None for towers without them)."""
    from sharp_cli.models.vision_attention import vision_tower

    return getattr(vision_tower(model), "blocks", None)

"""Timers, memory and FLOPs.

GPU times come from CUDA events read after a synchronise (host clocks would time the launch, not
the work); CPU times from perf_counter. FLOPs are analytic, from the config (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time


class Stopwatch:
    """Accumulates device time over start/stop pairs; `seconds` synchronises once at the end."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._pairs = []
        self._t0 = None

    def start(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._t0 = event
        else:
            self._t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._pairs.append((self._t0, event))
        else:
            self._pairs.append((self._t0, time.perf_counter()))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def seconds(self) -> float:
        if not self._pairs:
            return 0.0
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._pairs) / 1000.0
        return sum(b - a for a, b in self._pairs)


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device) -> int | None:
    """Peak GPU memory allocated by tensors since the last reset (None on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return None


def text_dims(config) -> dict:
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "mlp": text.intermediate_size,
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": head_dim,
        "vocab": text.vocab_size,
    }


def layer_flops(n: int, dims: dict) -> float:
    """FLOPs of one decoder layer over n tokens (causal prefill, grouped-query attention):
    2 x [2nD^2 (q, o) + 2nD*h_kv*d_h (k, v) + 2n^2*D (scores, values) + 3nDD' (gated MLP)]."""
    d, dm = dims["hidden"], dims["mlp"]
    kv = dims["kv_heads"] * dims["head_dim"]
    macs = 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * dm
    return 2.0 * macs


def causal_layer_flops(n: int, dims: dict) -> float:
    """The same with the causal half of the attention matrix skipped, as flash kernels do: at 6k
    tokens this is ~8% below layer_flops, at 1k tokens ~0.5%, so the formula's speed-up limit is a
    few percent above what equally efficient kernels can reach (docs/benchmarks.md)."""
    return layer_flops(n, dims) - 2.0 * n * n * dims["hidden"]


def prefill_flops(dims: dict, seq_len: int, kept_len: int, layer: int, per_layer=layer_flops) -> float:
    """LLM prefill FLOPs when layers 0..K-1 see seq_len tokens and K..L-1 see kept_len."""
    k = layer if kept_len < seq_len else dims["layers"]
    return k * per_layer(seq_len, dims) + (dims["layers"] - k) * per_layer(kept_len, dims)


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated timings."""
    ordered = sorted(samples)
    if not ordered:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}

"""CUDA graphs for the pruned layers K..L-1.

After pruning, each of the L-K layers runs on ~1k tokens: the GPU finishes a kernel faster than
Python launches the next, so eager prefill leaves a fifth or more of the FLOPs-limited speed-up on
the table. Replaying the whole tail from one CUDA graph removes the launch gaps.

Graphs are keyed by the sequence length rounded up to a bucket. Padding rows go at the end, and
under causal attention no real row sees them, so results are exact; the KV cache is trimmed back
to the real rows. A bucket is captured the second time it is seen (a one-off question gains
nothing from a capture); if capture fails (a kernel that syncs with the host, e.g. LLM.int8's
outlier path), that bucket runs eagerly from then on.

Memory stays bounded however many questions a process answers: at most `max_graphs` buckets are
kept (least recently used first out), and every graph of the process, these and the decode
steps', allocates from one shared memory pool. Sharing is safe because graphs run one at a time
on one stream and each graph's outputs are copied out before another graph runs.
"""

from __future__ import annotations

import functools

import torch

from sharp_cli.compat import cache_kwargs

_POOL = None
_KEEPER = None  # a one-kernel graph in the pool, alive for the process (shared_pool says why)


def shared_pool():
    """The one CUDA-graph memory pool of this process. A graph's capture counts a use of its pool
    and freeing the graph takes it back; when every graph of the pool had been freed while tensors of
    the pool were still alive (a vision cache replaced, its graph gone), the next capture into it
    failed an allocator assert (`use_count > 0`, Qwen3-VL's tower on an H100). A graph captured
    here and never freed keeps the count above zero."""
    global _POOL, _KEEPER
    if _POOL is None:
        handle = torch.cuda.graph_pool_handle()
        keeper = torch.cuda.CUDAGraph()
        with torch.cuda.graph(keeper, pool=handle):
            torch.zeros(1, device="cuda")
        _POOL, _KEEPER = handle, keeper
    return _POOL


@functools.cache
def _warmup_stream(device: int) -> "torch.cuda.Stream":
    """The one side stream of this process (per GPU) that captures warm up on. A new
    torch.cuda.Stream() per capture made cuBLAS allocate a workspace for every (handle, stream) pair
    it saw and keep it for the process's life: 0.05-0.13 GiB more allocated per question, 1 GiB over
    the CUDA check's 14 questions (torch cycles through 32 pooled streams)."""
    return torch.cuda.Stream(device)


def capture(warm_up, run):
    """(graph, run's output): `warm_up` once on the side stream, so kernels load and handles get made
    outside the graph, then `run` captured into the shared pool."""
    side = _warmup_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=shared_pool()):
        out = run()
    return graph, out


class _CollectKV:
    """Stands in for the cache during capture: keeps each layer's new K and V, allocates nothing."""

    def __init__(self):
        self.kv = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _Captured:
    def __init__(self, graph, hidden, cos, sin, out, kv):
        self.graph, self.hidden, self.cos, self.sin, self.out, self.kv = graph, hidden, cos, sin, out, kv


def run_layers(tail, hidden, position_embeddings, cache, **kwargs):
    """The pruned layers K..L-1, eagerly, on the kept rows: hidden (1, n, D), position_embeddings
    (cos, sin) of those rows, each layer's K/V written to `cache`. The one tail loop: the session
    runs it when there are no graphs (or a bucket failed to capture) and the graphs capture it.
    kwargs: the decoder layer's other arguments, passed through. Batch 1 without padding: causal
    SDPA needs no mask, and position_ids only serve packed batches."""
    kwargs = dict(kwargs, attention_mask=None, position_ids=None, position_embeddings=position_embeddings,
                  use_cache=True, **cache_kwargs(tail[0], cache))
    for layer in tail:
        hidden = layer(hidden, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


class TailGraphs:
    def __init__(self, bucket: int = 16, capture_after: int = 1, max_graphs: int = 8):
        self.bucket = bucket
        self.capture_after = capture_after  # sightings of a bucket before it is captured
        self.max_graphs = max_graphs
        self._graphs: dict = {}  # insertion order = least recently used first
        self._seen: dict = {}
        self._failed: set = set()
        self.replays = 0
        self.last_error: str | None = None

    def run(self, tail, hidden, position_embeddings, cache):
        n = hidden.shape[1]
        size = -(-n // self.bucket) * self.bucket
        cos, sin = position_embeddings
        key = (size, hidden.dtype, hidden.device, tuple(cos.shape[:-2]), cos.shape[-1], id(tail[0]), len(tail))
        entry = self._graphs.pop(key, None)
        if entry is not None:
            self._graphs[key] = entry  # most recently used
        else:
            if len(self._seen) > 4 * self.max_graphs:  # sightings of lengths seen once or twice
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if key in self._failed or self._seen[key] <= self.capture_after:
                return run_layers(tail, hidden, position_embeddings, cache)
            entry = self._capture(key, tail, size, hidden, cos, sin)
            if entry is None:
                return run_layers(tail, hidden, position_embeddings, cache)
        entry.hidden[:, :n].copy_(hidden)
        entry.hidden[:, n:].zero_()
        entry.cos[..., :n, :].copy_(cos)
        entry.sin[..., :n, :].copy_(sin)
        entry.cos[..., n:, :].fill_(1)
        entry.sin[..., n:, :].zero_()
        entry.graph.replay()
        self.replays += 1
        for layer, (k, v) in zip(tail, entry.kv):
            cache.update(k[..., :n, :], v[..., :n, :], layer.self_attn.layer_idx)  # copied into the cache
        return entry.out[:, :n].clone()

    def _capture(self, key, tail, size, hidden, cos, sin):
        static_hidden = hidden.new_zeros(hidden.shape[0], size, hidden.shape[2])
        pad_shape = (*cos.shape[:-2], size, cos.shape[-1])
        static_cos, static_sin = cos.new_ones(pad_shape), sin.new_zeros(pad_shape)
        collector = _CollectKV()
        try:
            graph, out = capture(
                lambda: run_layers(tail, static_hidden, (static_cos, static_sin), _CollectKV()),
                lambda: run_layers(tail, static_hidden, (static_cos, static_sin), collector))
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this bucket eagerly
            self._failed.add(key)
            self.last_error = f"{type(exc).__name__}: {exc}"
            torch.cuda.synchronize()
            return None
        kv = [collector.kv[layer.self_attn.layer_idx] for layer in tail]
        entry = _Captured(graph, static_hidden, static_cos, static_sin, out, kv)
        while len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = entry
        return entry

    def __len__(self) -> int:
        return len(self._graphs)

"""A KV cache preallocated per layer, each layer with its own length, written in place.

After pruning at layer K, layers 0..K-1 hold the whole prompt and layers K..L-1 only the kept
tokens, so one length for all layers (transformers' StaticCache) does not fit. `StaticKV` is a
transformers `Cache` whose layers are `KVLayer`s: buffers sized for the prompt plus the new tokens,
allocated once, so neither prefill nor decoding ever concatenates.

Prefill writes n rows at the layer's current length and gets back exactly the rows written so far,
so attention in prefill is the stock causal SDPA. Decoding writes one row per step at
`base + step`, both device tensors, and gets back the whole buffer: shapes never change, so a
decode step can be replayed from a CUDA graph; attention then masks the rows not yet written
with the layer's `valid` flags, which the decode step hands the text model as the keyword
`VALID_KWARG` (transformers passes extra keywords down to the attention function).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

VALID_KWARG = "sharp_valid_rows"  # per layer, the rows of its buffer written so far (decoding)


class KVLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, dtype, device, step: torch.Tensor,
                 buffers=None):
        """buffers: (keys (1, Hkv, capacity, d), values, valid (capacity,)) to write into instead of
        allocating: one slot of a batched cache (kv_slots.py), which a prefill fills in place."""
        super().__init__()
        self.capacity = capacity
        if buffers is None:
            self.keys = torch.zeros(1, kv_heads, capacity, head_dim, dtype=dtype, device=device)
            buffers = (self.keys, torch.zeros_like(self.keys), torch.zeros(capacity, dtype=torch.bool, device=device))
        self.keys, self.values, self.valid = buffers  # valid: rows written so far
        self.length = 0  # rows written by prefill (host int: prefill shapes are host-known anyway)
        self.base = torch.zeros(1, dtype=torch.long, device=device)  # = length, on the device
        self.step = step  # the cache's decode-step counter, shared by all layers
        self.decoding = False
        self.is_initialized = True
        self.device = torch.device(device)

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if self.decoding:
            where = self.base + self.step
            self.keys.index_copy_(2, where, key_states)
            self.values.index_copy_(2, where, value_states)
            self.valid.index_fill_(0, where, True)
            return self.keys, self.values
        n = key_states.shape[2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache layer holds {self.capacity} rows, {end} were written")
        self.keys[:, :, self.length:end].copy_(key_states)
        self.values[:, :, self.length:end].copy_(value_states)
        self.valid[self.length:end] = True
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        self.decoding = False
        self.valid.zero_()


class StaticKV(Cache):
    def __init__(self, capacities: list[int], kv_heads: int, head_dim: int, dtype, device, buffers=None):
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        layers = [KVLayer(c, kv_heads, head_dim, dtype, device, self.step, b)
                  for c, b in zip(capacities, buffers or [None] * len(capacities))]
        super().__init__(layers=layers)
        self.capacities = tuple(capacities)
        self.graphs: dict = {}  # decode-step graphs captured on these buffers (decode.py)

    def release(self) -> None:
        """Let go of the graphs captured on these buffers. Each holds a decode step that holds this
        cache: a reference cycle, which only a full garbage collection breaks, so an evicted cache's
        GPU memory would stay allocated until one ran."""
        self.graphs.clear()

    def reset(self) -> "StaticKV":
        """Empty, for the next question; the buffers (and graphs captured on them) stay."""
        for layer in self.layers:
            layer.reset()
        self.step.zero_()
        return self

    def start_decoding(self) -> None:
        """From here on every layer appends one row per step at its prefill length + step."""
        for layer in self.layers:
            layer.base.fill_(layer.length)
            layer.decoding = True
        self.step.zero_()

    def lengths(self, steps: int = 0) -> list[int]:
        """Rows each layer holds after `steps` decode steps."""
        return [layer.length + steps for layer in self.layers]

    def bytes_per_row(self) -> int:
        """Keys and values of one token in one layer."""
        keys = self.layers[0].keys
        return 2 * keys.shape[1] * keys.shape[3] * keys.element_size()

    def bytes_used(self, steps: int = 0) -> int:
        """Bytes of the rows holding tokens (the buffers' spare rows not counted)."""
        return sum(self.lengths(steps)) * self.bytes_per_row()

    def bytes_allocated(self) -> int:
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers)

    def valid_rows(self) -> list[torch.Tensor]:
        """Each layer's flags of written rows: what decode attention masks with."""
        return [layer.valid for layer in self.layers]


BUCKET = 256  # capacities are rounded up to this, so questions of similar length share buffers and graphs


class KVPool:
    """The caches of one loaded model, least recently used first out, so the memory they (and the
    graphs captured on them) hold stays bounded however many questions a process answers."""

    def __init__(self, max_caches: int = 4):
        self.max_caches = max_caches
        self._caches: dict = {}
        self.failed: dict = {}  # decode rules whose graph capture failed here -> the reason

    def acquire(self, lengths: list[int], kv_heads: int, head_dim: int, dtype, device) -> StaticKV:
        """An empty cache with room for at least lengths[i] rows in layer i."""
        capacities = tuple(-(-n // BUCKET) * BUCKET for n in lengths)
        key = (capacities, kv_heads, head_dim, dtype, str(device))
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= self.max_caches:  # free before allocating the next one
                self._caches.pop(next(iter(self._caches))).release()
            try:
                cache = StaticKV(list(capacities), kv_heads, head_dim, dtype, device)
            except torch.OutOfMemoryError:  # the caches kept for other lengths are in the way: drop them
                self.clear()
                cache = StaticKV(list(capacities), kv_heads, head_dim, dtype, device)
        self._caches[key] = cache  # most recently used last
        return cache.reset()

    def clear(self) -> None:
        for cache in self._caches.values():
            cache.release()
        self._caches.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __len__(self) -> int:
        return len(self._caches)

    def graph_count(self) -> int:
        return sum(len(cache.graphs) for cache in self._caches.values())

    def bytes_allocated(self) -> int:
        return sum(cache.bytes_allocated() for cache in self._caches.values())

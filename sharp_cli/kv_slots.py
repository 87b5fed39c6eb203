"""The KV cache of many sequences decoded together: S slots, each layer with its own capacity.

Layer l holds keys and values of shape (S, Hkv, C_l, d), allocated once; a sequence owns one slot
(one row of dim 0) from its prefill until it leaves. Pruning makes C_l short for l >= K, so a slot
of a pruned sequence costs a fraction of an unpruned one and more slots fit a memory budget.
Sequences in one step differ in how many rows they hold per layer: each slot has its own prefill
length per layer (`base`, (S,)) and decode-step count (`step`, (S,)), and `valid` ((S, C_l), per
layer) flags the rows written, which decode attention masks with (prune/attention.py).

A prefill writes into its slot through `slot_cache(s)`: a kv.StaticKV whose layers are views of
that slot, so the stock prefill path fills it in place. A decode step over the first B slots uses
`view(B)`: a transformers Cache whose layers write one row per sequence at base + step and hand
back the (B, Hkv, C_l, d) buffers. Shapes depend on B alone, so a step can be captured in a CUDA
graph per batch-size bucket. Slots past the live ones in a bucket step too; their writes are
clamped into their own buffers and thrown away when the slot is filled again.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sharp_cli import kv


def bucketed(lengths) -> tuple[int, ...]:
    """Capacities for these per-layer lengths (rounded up as the one-at-a-time pool rounds them)."""
    return tuple(-(-int(n) // kv.BUCKET) * kv.BUCKET for n in lengths)


class SlotLayer(CacheLayerMixin):
    """One layer of a decode step over slots [0, B): (B, Hkv, C, d) views of the layer's buffers."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys, values, valid, base, step):
        super().__init__()
        self.keys, self.values, self.valid, self.base, self.step = keys, values, valid, base, step
        batch, heads, self.capacity = keys.shape[0], keys.shape[1], keys.shape[2]
        self.rows = torch.arange(batch, device=keys.device).view(batch, 1)
        self.heads = torch.arange(heads, device=keys.device).view(1, heads)
        self.true = torch.ones(batch, 1, dtype=torch.bool, device=keys.device)
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states (B, Hkv, 1, d): row base + step of each sequence (clamped into the buffer, for
        slots that step past their end before the host has read that they are done)."""
        where = (self.base + self.step).clamp(max=self.capacity - 1).view(-1, 1)  # (B, 1)
        self.keys.index_put_((self.rows, self.heads, where), key_states[:, :, 0])
        self.values.index_put_((self.rows, self.heads, where), value_states[:, :, 0])
        self.valid.index_put_((self.rows, where), self.true)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0  # positions are always given; masks are never built (sharp's attention masks by `valid`)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_length(self) -> int:
        return self.capacity


class SlotView(Cache):
    def __init__(self, layers):
        super().__init__(layers=layers)


class SlotKV:
    def __init__(self, capacities, slots: int, kv_heads: int, head_dim: int, dtype, device):
        self.capacities = tuple(int(c) for c in capacities)
        self.slots = int(slots)
        shape = (self.slots, kv_heads)
        self.keys = [torch.zeros(*shape, c, head_dim, dtype=dtype, device=device) for c in self.capacities]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = [torch.zeros(self.slots, c, dtype=torch.bool, device=device) for c in self.capacities]
        self.base = [torch.zeros(self.slots, dtype=torch.long, device=device) for _ in self.capacities]
        self.step = torch.zeros(self.slots, dtype=torch.long, device=device)  # decode steps taken, per slot
        self.dims = (kv_heads, head_dim, dtype, torch.device(device))
        self._views: dict[int, SlotView] = {}

    @staticmethod
    def slot_bytes(capacities, kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one slot takes: keys, values and the written-rows flags of every layer."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(c * (2 * kv_heads * head_dim * size + 1) for c in capacities)

    def bytes_allocated(self) -> int:
        return self.slots * self.slot_bytes(self.capacities, *self.dims[:3])

    def fits(self, capacities) -> bool:
        return len(capacities) == len(self.capacities) and all(a <= b for a, b in zip(capacities, self.capacities))

    def view(self, batch: int) -> SlotView:
        """The cache a decode step over slots [0, batch) writes to (made once per batch size)."""
        if batch not in self._views:
            # One view object per buffer, shared by every user (the step reads `step` and `valid`
            # too): torch.compile takes distinct views of one buffer for aliased inputs, and
            # mutated aliased inputs failed to compile.
            step = self.step[:batch]
            self._views[batch] = SlotView([SlotLayer(k[:batch], v[:batch], ok[:batch], base[:batch], step)
                                           for k, v, ok, base in zip(self.keys, self.values, self.valid, self.base)])
        return self._views[batch]

    def valid_rows(self, batch: int) -> list[torch.Tensor]:
        """Each layer's (batch, C_l) written-rows flags: what decode attention masks with."""
        return [layer.valid for layer in self.view(batch).layers]

    def step_view(self, batch: int) -> torch.Tensor:
        """The (batch,) decode-step counters the layers of view(batch) write at."""
        return self.view(batch).layers[0].step

    def slot_cache(self, slot: int) -> kv.StaticKV:
        """An empty kv.StaticKV over slot `slot`'s buffers, for a prefill to fill in place."""
        kv_heads, head_dim, dtype, device = self.dims
        buffers = [(k[slot:slot + 1], v[slot:slot + 1], ok[slot])
                   for k, v, ok in zip(self.keys, self.values, self.valid)]
        return kv.StaticKV(list(self.capacities), kv_heads, head_dim, dtype, device, buffers=buffers).reset()

    def start(self, slot: int, lengths) -> None:
        """Slot `slot` decodes from here: layer l appends after its lengths[l] prefill rows."""
        for base, n in zip(self.base, lengths):
            base[slot] = int(n)
        self.step[slot] = 0

    def moved(self, capacities, slots: int, keep: list[int]) -> "SlotKV":
        """A new cache of these capacities (>= the current ones) and slot count, holding the slots
        `keep` (in that order, as slots 0, 1, ...) with every row they have written."""
        bigger = SlotKV(capacities, slots, *self.dims)
        index = torch.tensor(keep, dtype=torch.long, device=self.step.device)
        n = len(keep)
        for layer, c in enumerate(self.capacities):
            bigger.keys[layer][:n, :, :c].copy_(self.keys[layer].index_select(0, index))
            bigger.values[layer][:n, :, :c].copy_(self.values[layer].index_select(0, index))
            bigger.valid[layer][:n, :c].copy_(self.valid[layer].index_select(0, index))
            bigger.base[layer][:n].copy_(self.base[layer].index_select(0, index))
        bigger.step[:n].copy_(self.step.index_select(0, index))
        return bigger

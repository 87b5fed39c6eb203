"""Decode steps over many sequences at once: the batched counterpart of decode.py's step.

`Slots` holds, for S slots, everything a step reads and writes besides the KV cache
(kv_slots.SlotKV): the last token of each sequence, its next position, the tokens it has seen (for
the repetition penalty) and its sampling rules as tensors (sampling.RowRules). A step over the
first B slots embeds B tokens, runs transformers' own text model for one position of each (layers
K.. read only the kept rows of a pruned sequence: a shorter buffer and its own `valid` flags), picks
each row's next token under its own rules and advances each slot's step counter, all on the
device. The weights are read once per step however many sequences it carries, which is the point.

Steps are made per batch-size bucket (1, 2, 4, 8, ...): on CUDA each is captured in a CUDA graph
the first time its bucket runs (shapes depend on B only), eagerly elsewhere, or when a capture
fails. Graphs live with their Slots and go when the slots are resized.
"""

from __future__ import annotations

import time

import torch

from sharp_cli import kv
from sharp_cli.compat import cache_kwargs
from sharp_cli.kv_slots import SlotKV
from sharp_cli.loading import Loaded
from sharp_cli.sampling import pick_rows, row_rules


def bucket(n: int, slots: int) -> int:
    """The batch size a step over slots [0, n) runs at: the next power of two, at most `slots`."""
    size = 1
    while size < n:
        size *= 2
    return min(size, slots)


class Slots:
    """Per-slot decode state of up to S sequences, next to their KV cache."""

    def __init__(self, loaded: Loaded, cache: SlotKV, position_lead: tuple[int, ...]):
        self.loaded, self.cache = loaded, cache
        slots, device = cache.slots, cache.step.device
        vocab = loaded.adapter.lm_head(loaded.model).out_features
        self.token = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(*position_lead, slots, 1, dtype=torch.long, device=device)  # first decoded
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.rules = row_rules(slots, device)
        self.steps: dict = {}  # (batch, sample) -> _BatchStep
        self.failed: dict = {}  # (batch, sample) -> why its capture failed

    @property
    def slots(self) -> int:
        return self.cache.slots

    def join(self, slot: int, state, encoded, prompt_ids, rules, seed: int) -> None:
        """Slot `slot` takes a prefilled sequence: its rules, the tokens it has seen (the prompt:
        generate() counts it for the penalty), its next position, and its first token picked from
        the prefill logits under the same rules as every later one."""
        row = slice(slot, slot + 1)
        self.rules.set(slot, rules, seed)
        self.seen[slot].zero_()
        if rules.repetition_penalty != 1.0:
            self.seen[slot, prompt_ids.reshape(-1).to(self.seen.device)] = True
        self.position[..., row, :] = encoded.next_position.reshape(*self.position.shape[:-2], 1, 1)
        counter = torch.zeros(1, dtype=torch.long, device=self.token.device)
        first = pick_rows(state.logits.reshape(1, -1), self.rules.rows(slot, slot + 1), self.seen[row], counter,
                          sample=not rules.sampling.greedy)
        self.token[row] = first
        self.seen[row].scatter_(1, first, True)
        self.cache.start(slot, state.cache.lengths())

    def moved(self, cache: SlotKV, keep: list[int]) -> "Slots":
        """These slots' state in a new (resized) cache, slots `keep` first (as cache.moved placed them)."""
        other = Slots(self.loaded, cache, tuple(self.position.shape[:-2]))
        index = torch.tensor(keep, dtype=torch.long, device=self.token.device)
        n = len(keep)
        other.token[:n] = self.token.index_select(0, index)
        other.position[..., :n, :] = self.position.index_select(-2, index)
        other.seen[:n] = self.seen.index_select(0, index)
        for name in ("penalty", "greedy", "temperature", "top_k", "top_p", "seed"):
            getattr(other.rules, name)[:n] = getattr(self.rules, name).index_select(0, index)
        return other

    def stepper(self, batch: int, sample: bool):
        """(run one step over slots [0, batch), mode, capture seconds spent now, note)."""
        key = (batch, sample)
        if key in self.steps:
            step = self.steps[key]
            return step.replay or step, step.mode, 0.0, None
        step = _BatchStep(self, batch, sample)
        self.steps[key] = step
        want_graph = self.token.device.type == "cuda" and self.loaded.graphs is not None
        if not want_graph or key in self.failed:
            return step, "eager", 0.0, self.failed.get(key)
        seconds = step.capture()
        if step.replay is None:
            self.failed[key] = step.note
            return step, "eager", 0.0, step.note
        return step.replay, step.mode, seconds, None


class _BatchStep:
    def __init__(self, slots: Slots, batch: int, sample: bool):
        loaded = slots.loaded
        self.batch, self.sample = batch, sample  # no reference to `slots`: its steps dict holds this step
        self.model, self.adapter = loaded.model, loaded.adapter
        self.text = loaded.adapter.text_model(loaded.model)
        self.head = loaded.adapter.lm_head(loaded.model)
        cache = slots.cache
        self.cache_kwargs = cache_kwargs(self.text, cache.view(batch))
        self.valid = cache.valid_rows(batch)
        self.token, self.seen = slots.token[:batch], slots.seen[:batch]
        self.position, self.step = slots.position[..., :batch, :], cache.step_view(batch)
        self.rules = slots.rules.rows(0, batch)
        self.whole_state = [slots.token, slots.seen, cache.step, *cache.valid]  # what a step changes, all slots
        self.replay, self.mode, self.note = None, "eager", None
        self._compiled = None  # the unbound function: a bound method on self is a cycle (decode.Step)
        if loaded.compiled:
            from sharp_cli.decode import compiled

            self._compiled = compiled(type(self).advance)

    def __call__(self) -> None:
        if self._compiled is not None:
            self._compiled(self)
        else:
            self.advance()

    def advance(self) -> None:
        embeds = self.adapter.embed(self.model, self.token)  # (B, 1, D)
        positions = self.position + self.step.view(-1, 1)
        out = self.text(inputs_embeds=embeds, position_ids=positions, use_cache=True,
                        **{kv.VALID_KWARG: self.valid}, **self.cache_kwargs)
        logits = self.head(out.last_hidden_state[:, -1])  # (B, vocab)
        self.token.copy_(pick_rows(logits, self.rules, self.seen, self.step + 1, self.sample))
        self.seen.scatter_(1, self.token, True)
        self.step.add_(1)

    def state(self) -> list[torch.Tensor]:
        return self.whole_state

    def capture(self) -> float:
        """Capture this step in a CUDA graph; returns the seconds it took (0 and a note on failure).
        The warm-up runs on the real buffers, so the state it changes is put back; the cache rows
        it wrote are rewritten by the first replay."""
        from sharp_cli.prune.graphs import capture

        started = time.perf_counter()
        saved = [t.clone() for t in self.state()]
        try:
            graph, _ = capture(self, self)
        except Exception as exc:  # noqa: BLE001 - a kernel that syncs (LLM.int8's outliers): run eagerly
            self.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            graph = None
        torch.cuda.synchronize()
        for tensor, value in zip(self.state(), saved):
            tensor.copy_(value)
        torch.cuda.synchronize()
        if graph is None:
            return 0.0
        self.graph, self.replay, self.mode = graph, graph.replay, "cuda graph"
        return time.perf_counter() - started

"""Continuous batching: many questions, one loaded model, their decoding shared step by step.

A request waits in line; at its turn it is begun (prompt, vision encoder, positional prior), then
prefilled alone, with its own pruning, straight into a free slot of the batched KV cache
(kv_slots.py), and joins the running decode batch (batch_decode.py). Each step decodes one token
of every sequence in the batch; a sequence leaves at EOS, at its length, or when cancelled, and its
slot is free for the next request, without stopping the others. Each sequence keeps its own
sampling rules, repetition penalty, stop reason and streaming callback.

How many are in flight: at most `max_batch`, and as many slots as fit `kv_bytes`. A slot's size
is the per-layer capacity the sequences need (a pruned one needs far less from layer K on), so
pruned sequences fit more per budget. A request that needs more rows than the slots have grows
them (the live sequences are moved over) when the budget allows that many slots, else it waits,
and the requests behind it wait too (first come, first served).

The host never waits for a step it just launched (CUDA): each step's tokens are copied into pinned
memory behind it and read up to decode.LAG steps later, so a sequence that stopped may ride along
for a few more steps, whose tokens are thrown away; its slot is reused once its end is read.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from sharp_cli import answer as answer_mod
from sharp_cli import engine, measure
from sharp_cli.batch_decode import Slots, bucket
from sharp_cli.decode import LAG, Decoded
from sharp_cli.errors import is_out_of_memory, release_gpu_memory
from sharp_cli.kv_slots import SlotKV, bucketed
from sharp_cli.loading import Loaded
from sharp_cli.prune.config import require_resolved
from sharp_cli.prune.prior import PriorStore
from sharp_cli.sampling import rules_for
from sharp_cli.text_stream import TextStream

DEFAULT_CPU_KV_BYTES = 4 * 2**30
CUDA_FREE_SHARE = 0.6  # of the GPU memory free once the model is loaded, when no --kv-gb is given


@dataclass
class Request:
    clip: object
    question: str
    cfg: object  # PruneConfig resolved for the model (loaded.resolve_prune)
    max_new_tokens: int = 128
    max_pixels: int | None = None
    sampling: object = None  # sampling.Sampling, or None: greedy
    on_text: Callable | None = None  # gets the answer's text as it is decoded (pieces join to it)
    cancel: Callable | None = None  # asked between tokens; True ends the answer ("cancelled")
    ignore_eos: bool = False
    tag: object = None  # the caller's
    inputs: object = None  # the processor's, made ahead in the caller's thread (engine.prepare, to_device=False)


@dataclass
class Done:
    request: Request
    answer: object = None  # answer.Answer
    error: BaseException | None = None


class Cancelled(Exception):
    """The request was cancelled before its prefill."""


def default_kv_bytes(loaded: Loaded) -> int:
    if loaded.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(loaded.device)
        return int(free * CUDA_FREE_SHARE)
    return DEFAULT_CPU_KV_BYTES


class _Sequence:
    """One admitted request, from its prefill to its last token."""

    def __init__(self, request: Request, begun, slot: int, tokenizer):
        self.request, self.begun, self.slot = request, begun, slot
        self.stream = TextStream(tokenizer, request.on_text)
        self.tokens: list[int] = []
        self.stop: str | None = None
        self.launched = 0  # steps launched that carry it
        self.in_flight = 1  # the most sequences that shared one of its steps
        self.mode, self.capture_seconds, self.note = "eager", 0.0, None
        self.first_step: float | None = None
        self.last_token: float | None = None

    @property
    def wants_steps(self) -> bool:
        return self.stop is None and self.launched < self.request.max_new_tokens - 1

    def take(self, token: int) -> None:
        """One more token, read in order: stream it, then see whether the answer ends here."""
        rules, request = self.begun.rules, self.request
        self.tokens.append(token)
        self.last_token = time.perf_counter()
        if token not in rules.eos:  # EOS is not text
            self.stream.push(token)
        if token in rules.eos and not request.ignore_eos:
            self.stop = "eos"
        elif request.cancel is not None and request.cancel():
            self.stop = "cancelled"
        elif len(self.tokens) >= request.max_new_tokens:
            self.stop = "length"


class _Pending:
    def __init__(self, request: Request):
        self.request, self.begun = request, None


class Scheduler:
    def __init__(self, loaded: Loaded, *, max_batch: int = 16, kv_bytes: int | None = None,
                 store: PriorStore | None = None, cache=None):
        self.loaded = loaded
        self.max_batch = max(1, int(max_batch))
        self.kv_bytes = int(kv_bytes) if kv_bytes else default_kv_bytes(loaded)
        self.store = store if store is not None else PriorStore()
        self.cache = cache  # video_cache.VideoCache, or None
        self.slots: Slots | None = None
        self.stats: Counter = Counter(steps=0, joined=0, resized=0, most_in_flight=0)
        self._queue: deque[_Pending] = deque()
        self._live: dict[int, _Sequence] = {}  # slot -> sequence
        self._log = _TokenLog()
        self._log.reset(0)
        self._done: list[Done] = []
        measure.reset_peak_memory(loaded.device)

    # -- the caller's side -------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        require_resolved(request.cfg, "Scheduler.submit")  # the caller's mistake: loud, not a failed answer
        self._queue.append(_Pending(request))

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._live and not self._log.pending

    def wants_more(self) -> bool:
        """Whether a request submitted now could start at once: nobody waiting, a slot free."""
        return not self._queue and (self.slots is None or len(self._live) < self.slots.slots)

    @torch.inference_mode()
    def advance(self) -> list[Done]:
        """Admit what fits, run one decode step, read what is ready; returns the requests that ended."""
        self._admit()
        if any(seq.wants_steps for seq in self._live.values()):
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the whole batch fails; the scheduler goes on
                self._fail_batch(exc)
            else:
                self._read(LAG)
        elif self._live or self._log.pending:
            self._read(0)
        done, self._done = self._done, []
        return done

    def run(self, requests: Iterable[Request]) -> Iterator[Done]:
        """Answer every request of `requests`, taking the next one only when it could start; yields
        each as it ends (not in order)."""
        feed, more = iter(requests), True
        while True:
            while more and self.wants_more():
                try:
                    self.submit(next(feed))
                except StopIteration:
                    more = False
            yield from self.advance()
            if not more and self.idle:
                return

    @torch.inference_mode()
    def cancel_all(self) -> None:
        """End every request now (waiting ones as Cancelled, live ones with stop "cancelled")."""
        while self._queue:
            self._done.append(Done(self._queue.popleft().request, error=Cancelled("cancelled")))
        self._read(0)
        for seq in list(self._live.values()):
            seq.stop = "cancelled"
            self._finish(seq)

    # -- admission ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._queue:
            pending = self._queue[0]
            request = pending.request
            try:
                if request.cancel is not None and request.cancel():
                    raise Cancelled("cancelled before its turn")
                if pending.begun is None:
                    pending.begun = self._begin(request)
                slot = self._place(pending.begun)
                if slot is None:
                    return  # it waits for room, and so does everything behind it
                self._queue.popleft()
                self._join(request, pending.begun, slot)
            except Exception as exc:  # noqa: BLE001 - this request fails; the others go on
                if self._queue and self._queue[0] is pending:
                    self._queue.popleft()
                self._done.append(Done(request, error=exc))
                if is_out_of_memory(exc):
                    del exc
                    release_gpu_memory()

    def _begin(self, request: Request):
        loaded = self.loaded
        rules = rules_for(loaded.model, loaded.processor.tokenizer, request.sampling)
        inputs, request.inputs = request.inputs, None  # the host copy of the pixels is not kept past here
        return answer_mod.begin(loaded, request.clip, request.question, request.cfg,
                                max_new_tokens=request.max_new_tokens, max_pixels=request.max_pixels, store=self.store,
                                rules=rules, cache=self.cache, reset_peak=False, inputs=inputs)

    def _join(self, request: Request, begun, slot: int) -> None:
        """Prefill into the slot, pick the first token, and join the batch (or end at once)."""
        cache = self.slots.cache.slot_cache(slot)
        state = answer_mod.prefill(begun, cache)
        seed = begun.rules.sampling.seed
        self.slots.join(slot, state, begun.encoded, begun.prompt_ids, begun.rules,
                        seed if seed is not None else random.getrandbits(31))
        seq = _Sequence(request, begun, slot, self.loaded.processor.tokenizer)
        self.stats["joined"] += 1
        seq.take(int(self.slots.token[slot]))  # waits for the prefill: it has to end before the next step anyway
        # What the answer keeps is the layout: the embeddings and vision output can go now.
        begun.encoded.inputs_embeds = begun.encoded.features = None
        if seq.stop is not None:
            self._finish(seq)
        else:
            self._live[slot] = seq

    def _place(self, begun) -> int | None:
        """A free slot with room for this sequence (the slots allocated, grown or shrunk as needed),
        or None when it must wait."""
        need = bucketed(engine.cache_lengths(self.loaded, begun.encoded, begun.cfg, begun.max_new_tokens))
        lead = tuple(begun.encoded.next_position.shape[:-2])
        dtype = begun.encoded.inputs_embeds.dtype
        current = self.slots.cache if self.slots is not None else None
        if current is None or (not self._live and self._fresh_is_better(current, need, dtype)):
            self._allocate(need, self._slot_count(need, dtype), dtype, lead)
        elif not current.fits(need):
            grown = tuple(max(a, b) for a, b in zip(need, current.capacities))
            count = self._slot_count(grown, dtype)
            if count <= len(self._live):
                return None
            self._resize(grown, count)
        free = [s for s in range(self.slots.slots) if s not in self._live]
        return free[0] if free else None

    def _slot_count(self, capacities, dtype) -> int:
        dims = self.loaded.dims
        per_slot = SlotKV.slot_bytes(capacities, dims["kv_heads"], dims["head_dim"], dtype)
        return max(1, min(self.max_batch, self.kv_bytes // per_slot))

    def _fresh_is_better(self, current: SlotKV, need, dtype) -> bool:
        """With nothing in flight: reallocate when the request does not fit, or when slots of its
        size would let more sequences in than the current (larger) ones do."""
        return not current.fits(need) or (current.slots < self.max_batch
                                          and self._slot_count(need, dtype) > current.slots)

    def _allocate(self, capacities, count: int, dtype, lead) -> None:
        self.slots = None  # the old buffers (and graphs on them) go before the new ones are made
        dims = self.loaded.dims
        cache = SlotKV(capacities, count, dims["kv_heads"], dims["head_dim"], dtype, self.loaded.device)
        self.slots = Slots(self.loaded, cache, lead)
        self._log.reset(count)

    def _resize(self, capacities, count: int) -> None:
        self._read(0)  # every step in flight read, so that the slots can move
        keep = sorted(self._live)
        cache = self.slots.cache.moved(capacities, count, keep)
        self.slots = self.slots.moved(cache, keep)
        self._live = {new: self._live[old] for new, old in enumerate(keep)}
        for new, seq in self._live.items():
            seq.slot = new
        self._log.reset(count)
        self.stats["resized"] += 1

    # -- decoding ----------------------------------------------------------------------------------
    def _step(self) -> None:
        live = self._live
        batch = bucket(max(live) + 1, self.slots.slots)
        sample = any(not seq.begun.rules.sampling.greedy for seq in live.values())
        run, mode, capture_s, note = self.slots.stepper(batch, sample)
        run()
        now = time.perf_counter()
        owners = list(live.items())
        for _, seq in owners:
            seq.launched += 1
            seq.in_flight = max(seq.in_flight, len(owners))
            seq.mode, seq.note = mode, note or seq.note
            seq.capture_seconds += capture_s
            if seq.first_step is None:
                seq.first_step = now
        self._log.push(self.slots.token[:batch], owners)
        self.stats["steps"] += 1
        self.stats["most_in_flight"] = max(self.stats["most_in_flight"], len(owners))

    def _read(self, behind: int) -> None:
        """Hand on the tokens of finished steps (waiting while more than `behind` are in flight)."""
        for owners, tokens in self._log.ready(behind):
            for slot, seq in owners:
                if seq.stop is None:
                    seq.take(int(tokens[slot]))
                    if seq.stop is not None:
                        self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        if self._live.get(seq.slot) is seq:
            del self._live[seq.slot]
        seconds = (seq.last_token - seq.first_step) if seq.first_step is not None else 0.0
        mode = f"batched {seq.mode}"
        decoded = Decoded(seq.tokens, seconds, mode, seq.capture_seconds, seq.stop, seq.note)
        answer = answer_mod.finish(seq.begun, decoded, seq.stream, extra={"decode_batch": seq.in_flight})
        self._done.append(Done(seq.request, answer))

    def _fail_batch(self, exc: BaseException) -> None:
        """A step failed (out of memory, ...): every live sequence ends with that error, and the
        slots are made again for the next requests."""
        for seq in list(self._live.values()):
            seq.stop = "error"
            self._done.append(Done(seq.request, error=exc))
        self._live.clear()
        self._log.reset(0)
        self.slots = None
        if is_out_of_memory(exc):
            release_gpu_memory()


class _TokenLog:
    """The tokens of launched steps, copied off the device behind them and read in order. On CUDA
    into rows of a pinned ring: at most LAG + 1 steps are unread at a time, so rows are reused
    only once read."""

    ROWS = 2 * LAG + 2

    def __init__(self):
        self.entries: deque = deque()  # (host tokens, event or None, owners)
        self.ring, self.next_row = None, 0

    @property
    def pending(self) -> int:
        return len(self.entries)

    def reset(self, slots: int) -> None:
        self.entries.clear()
        self.ring = None
        self.slots = slots

    def push(self, tokens: torch.Tensor, owners) -> None:
        if tokens.device.type == "cuda":
            if self.ring is None:
                self.ring = torch.empty(self.ROWS, max(1, self.slots), dtype=torch.long, pin_memory=True)
            host = self.ring[self.next_row, :tokens.shape[0]]
            self.next_row = (self.next_row + 1) % self.ROWS
            host.copy_(tokens.view(-1), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tokens.view(-1).clone(), None
        self.entries.append((host, event, owners))

    def ready(self, behind: int):
        """(owners, host tokens) of each step whose tokens are on the host, oldest first: those that
        are done, and as many more as it takes (waiting) to leave at most `behind` in flight."""
        while self.entries:
            host, event, owners = self.entries[0]
            if event is not None:
                if len(self.entries) > behind:
                    event.synchronize()
                elif not event.query():
                    return
            self.entries.popleft()
            yield owners, host

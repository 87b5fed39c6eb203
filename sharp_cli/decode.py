"""The decode phase, gpt-fast style: one decode step with fixed shapes on the preallocated per-layer
KV cache (kv.py), replayed from a CUDA graph on CUDA, the same step run eagerly elsewhere.

A step reads the last token, runs transformers' own text model for one position (layers K.. read
only the kept tokens' rows: their cache is shorter), applies the checkpoint's rules
(sampling.pick) and writes the next token, all on the device. The host never waits for a step it
just launched: it copies each token into pinned memory behind the step and reads it up to `LAG`
steps later, to stream it and to spot EOS; steps launched past an EOS are thrown away.

Graphs live on the cache they were captured on (`StaticKV.graphs`), so a graph is reused by every
later question whose lengths fall in the same buckets (kv.KVPool), and evicting a cache frees its
graphs. All graphs, here and for the pruned prefill tail, share one memory pool (prune/graphs.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sharp_cli import kv
from sharp_cli.compat import cache_kwargs
from sharp_cli.engine import Prefill
from sharp_cli.loading import Loaded
from sharp_cli.sampling import Rules, pick, rules_for

LAG = 8  # steps the GPU may run ahead of the token the host reads
MIN_STEPS_TO_CAPTURE = 4  # a capture costs about two eager steps; fewer steps than this run eagerly
GRAPHS_PER_CACHE = 2  # decode rules (greedy, sampling, ...) kept captured per cache


@dataclass
class Decoded:
    tokens: list[int]
    seconds: float  # the steps after the first token, up to the last token kept (device time)
    mode: str  # "cuda graph" or "eager"
    capture_seconds: float = 0.0  # spent capturing a graph for this answer (0 when reused or eager)
    stop: str = "length"  # "eos", "length" or "cancelled"
    note: str | None = None  # why no graph was used, when one could have been
    logits: object = None  # (tokens, vocab) float logits each token was picked from (keep_logits only)

    @property
    def tokens_per_second(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.seconds if steps > 0 and self.seconds > 0 else None


class Step:
    """One decode step and the state it reads and writes (static tensors, so it can be captured)."""

    def __init__(self, loaded: Loaded, cache: kv.StaticKV, rules: Rules, next_position: torch.Tensor,
                 keep_logits: int = 0):
        self.loaded, self.cache, self.rules = loaded, cache, rules
        device = cache.step.device
        self.text = loaded.adapter.text_model(loaded.model)
        self.head = loaded.adapter.lm_head(loaded.model)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros_like(next_position)
        vocab = self.head.out_features
        self.seen = (torch.zeros(1, vocab, dtype=torch.bool, device=device)
                     if rules.repetition_penalty != 1.0 else None)
        self.logits = torch.zeros(keep_logits, vocab, device=device) if keep_logits else None
        self.valid = cache.valid_rows()
        self.cache_kwargs = cache_kwargs(self.text, cache)
        # The unbound function, not self.advance: a bound method kept on self is a reference cycle,
        # and the cycle would hold this step's cache (tens of MB of KV rows) after the pool evicted
        # it, until a full garbage collection (cuda_check's bounded-memory check, H100 2026-12-05).
        self._compiled = compiled(Step.advance) if loaded.compiled else None

    def start(self, logits: torch.Tensor, prompt_ids: torch.Tensor, next_position: torch.Tensor) -> None:
        """The first token, from the prefill logits, under the same rules as every later one."""
        self.position.copy_(next_position)
        if self.seen is not None:
            self.seen.zero_()
            self.seen[0, prompt_ids.reshape(-1).to(self.seen.device)] = True  # generate() counts the prompt
        self.token.copy_(pick(logits.reshape(1, -1), self.rules, self.seen))
        self._mark_seen()
        if self.logits is not None:
            self.logits[0] = logits.reshape(-1).float()
        self.cache.start_decoding()

    def __call__(self) -> None:
        if self._compiled is not None:
            self._compiled(self)
        else:
            self.advance()

    def advance(self) -> None:
        embeds = self.loaded.adapter.embed(self.loaded.model, self.token)
        out = self.text(inputs_embeds=embeds, position_ids=self.position + self.cache.step, use_cache=True,
                        **{kv.VALID_KWARG: self.valid}, **self.cache_kwargs)
        logits = self.head(out.last_hidden_state[:, -1])
        self.token.copy_(pick(logits, self.rules, self.seen))
        self._mark_seen()
        if self.logits is not None:
            self.logits.index_copy_(0, self.cache.step + 1, logits.float())
        self.cache.step.add_(1)

    def _mark_seen(self) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, self.token, True)

    def state(self) -> list[torch.Tensor]:
        tensors = [self.token, self.cache.step] + [layer.valid for layer in self.cache.layers]
        return tensors + ([self.seen] if self.seen is not None else [])


def compiled(advance):
    """The step through torch.compile (inductor): RMSNorm, rotary embedding, residual adds and the
    activation become a few fused kernels instead of ~35 small ones per layer (decode step 8.1 ->
    5.9 ms on an H200), and the CUDA graph then replays those. The whole step, not one layer: each
    layer indexes the cache by its own layer_idx, which dynamo specialises on, so a compiled layer
    recompiles for every layer (28 compilations, past dynamo's limit of 8). Buffer lengths are
    symbolic, so every cache size shares one compilation (engine.cache_lengths keeps an unpruned
    cache's first K layers longer for that); the code cache is per function, so all steps share
    it. The price: 73-82 s for the first answer of a 7B model in `sharp bench` (H200)."""
    return torch.compile(advance, dynamic=True)


def capture_step(step: Step):
    """(graph, seconds) for one step, or (None, reason). The warm-up step runs on the real buffers,
    so the state it changes is put back; the cache row it wrote is rewritten by the first replay."""
    from sharp_cli.prune.graphs import capture

    t0 = time.perf_counter()
    saved = [t.clone() for t in step.state()]
    try:
        graph, _ = capture(step, step)
    except Exception as exc:  # noqa: BLE001 - a kernel that syncs (LLM.int8's outliers): run eagerly
        torch.cuda.synchronize()
        for tensor, value in zip(step.state(), saved):
            tensor.copy_(value)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    for tensor, value in zip(step.state(), saved):
        tensor.copy_(value)
    torch.cuda.synchronize()
    return graph, time.perf_counter() - t0


def _rules_key(loaded: Loaded, rules: Rules, next_position: torch.Tensor, keep_logits: int) -> tuple:
    return (rules.repetition_penalty, rules.sampling, tuple(next_position.shape), keep_logits, loaded.compiled)


def _stepper(loaded: Loaded, cache: kv.StaticKV, rules: Rules, next_position, steps: int, keep_logits: int):
    """(step object, run-one-step callable, mode, capture seconds, note)."""
    pool = loaded.kv_pool
    key = _rules_key(loaded, rules, next_position, keep_logits)
    want_graph = cache.step.device.type == "cuda" and loaded.graphs is not None and steps >= MIN_STEPS_TO_CAPTURE
    if not want_graph:
        step = Step(loaded, cache, rules, next_position, keep_logits)
        return step, step, "eager", 0.0, None
    if key in cache.graphs:
        step, graph = cache.graphs[key]
        return step, graph.replay, "cuda graph", 0.0, None
    step = Step(loaded, cache, rules, next_position, keep_logits)
    if key in pool.failed:
        return step, step, "eager", 0.0, pool.failed[key]
    return step, None, "capture", 0.0, None  # captured once the first token is in place


def decode(loaded: Loaded, encoded, state: Prefill, max_new_tokens: int, *, prompt_ids: torch.Tensor,
           rules: Rules | None = None, on_token=None, should_stop=None, ignore_eos: bool = False,
           keep_logits: bool = False) -> Decoded:
    """Tokens from the prefill logits on: the first one, then up to max_new_tokens - 1 steps; stops
    at EOS (unless ignore_eos) or when should_stop() says so. on_token(id) sees each token in order;
    keep_logits keeps the logits of every token (for checks and agreement figures)."""
    rules = rules or rules_for(loaded.model, loaded.processor.tokenizer)
    cache = state.cache
    steps = max_new_tokens - 1
    kept_logits = max_new_tokens if keep_logits else 0
    key = _rules_key(loaded, rules, encoded.next_position, kept_logits)
    with torch.inference_mode():
        step, run, mode, capture_s, note = _stepper(loaded, cache, rules, encoded.next_position, steps, kept_logits)
        step.start(state.logits, prompt_ids, encoded.next_position)
        if run is None:  # first use of these buffers with these rules: capture now
            graph, result = capture_step(step)
            if graph is None:
                loaded.kv_pool.failed[key] = result
                run, mode, note = step, "eager", result
            else:
                _keep(cache, key, step, graph)
                run, mode, capture_s = graph.replay, "cuda graph", result
        reader = _TokenReader(cache.step.device, max_new_tokens)
        reader.push(step.token)
        tokens: list[int] = []
        stop = "length"

        def drain(behind: int) -> bool:
            """Read tokens that are ready (waiting while more than `behind` are in flight); True to stop."""
            nonlocal stop
            while reader.unread():
                token = reader.take(block=reader.unread() > behind)
                if token is None:
                    return False
                tokens.append(token)
                if on_token is not None:
                    on_token(token)
                if token in rules.eos and not ignore_eos:
                    stop = "eos"
                    return True
                if should_stop is not None and should_stop():
                    stop = "cancelled"
                    return True
            return False

        done = drain(LAG)
        reader.mark_start()
        launched = 0
        while not done and launched < steps:
            run()
            launched += 1
            reader.push(step.token)
            done = drain(LAG)
        if not done:
            drain(0)
    logits = step.logits[:len(tokens)].clone() if step.logits is not None else None
    return Decoded(tokens, reader.seconds(len(tokens) - 1), mode, capture_s, stop, note, logits)


def _keep(cache: kv.StaticKV, key, step: Step, graph) -> None:
    cache.graphs[key] = (step, graph)
    while len(cache.graphs) > GRAPHS_PER_CACHE:
        cache.graphs.pop(next(iter(cache.graphs)))


class _TokenReader:
    """Tokens copied off the device behind the steps that made them; read in order, lazily."""

    def __init__(self, device, capacity: int):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(capacity, dtype=torch.long, pin_memory=self.cuda)
        self.events: list = []
        self.done = 0
        self._start = None
        self._times: list[float] = []

    def push(self, token: torch.Tensor) -> None:
        i = len(self.events)
        if self.cuda:
            self.host[i:i + 1].copy_(token.view(1), non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.host[i] = token.view(())
            self.events.append(None)
            self._times.append(time.perf_counter())

    def mark_start(self) -> None:
        """Decode time counts from here (after the first token)."""
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def unread(self) -> int:
        return len(self.events) - self.done

    def take(self, block: bool) -> int | None:
        event = self.events[self.done]
        if self.cuda:
            if not block and not event.query():
                return None
            event.synchronize()
        token = int(self.host[self.done])
        self.done += 1
        return token

    def seconds(self, last: int) -> float:
        """Device time from mark_start to the event of token `last` (0 when no step ran)."""
        if last < 1 or self._start is None:
            return 0.0
        if self.cuda:
            self.events[last].synchronize()
            return self._start.elapsed_time(self.events[last]) / 1000.0
        return self._times[last] - self._start

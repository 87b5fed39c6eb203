"""The decode phase: token-for-token equality with transformers' generate(), the checkpoint's rules
(repetition penalty, EOS), sampling, streaming, cancelling, and bounded cache/graph memory."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, encode, load_tiny, make_clip, prune_layer
from sharp_cli import engine
from sharp_cli.answer import ask
from sharp_cli.decode import decode
from sharp_cli.kv import BUCKET, KVPool
from sharp_cli.peers import stock_attention
from sharp_cli.prune import PruneConfig
from sharp_cli.sampling import Sampling, rules_for
from sharp_cli.text_stream import TextStream

QUESTION = "what colour is the ball?"
PIXELS = 56 * 56 * 4


def _generate(loaded, clip, new_tokens, **kwargs):
    inputs = engine.prepare(loaded, clip, QUESTION, PIXELS)
    with stock_attention(loaded), torch.inference_mode():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_tokens_equal_generate_with_the_checkpoints_repetition_penalty(penalised, family):
    loaded = penalised(family)
    clip = make_clip(seed=1)
    ours = ask(loaded, clip, QUESTION, loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=12,
               max_pixels=PIXELS)
    reference = _generate(loaded, clip, 12)
    assert ours.tokens == reference
    # The penalty is what makes them equal: without it generate() says something else.
    assert _generate(loaded, clip, 12, repetition_penalty=1.0) != reference


def test_a_compiled_decode_step_gives_generates_tokens_for_every_length(penalised, monkeypatch):
    """torch.compile (inductor, here on the CPU) of the step, with the penalty; two prompt lengths in
    one process (symbolic buffer lengths: the second must not need a different answer path)."""
    from torch._dynamo.utils import counters

    from sharp_cli import kv

    # Small buckets, so that pruned layers get shorter buffers than the first K, as at real sizes
    # (with 256-row buckets every tiny cache is 256 rows in every layer).
    monkeypatch.setattr(kv, "BUCKET", 16)
    loaded = penalised("qwen2.5-vl")
    loaded.use_compile(True)
    traced = counters["frames"]["total"]
    try:
        for seed, frames in ((3, 8), (4, 4)):
            clip = make_clip(frames=frames, seed=seed)
            ours = ask(loaded, clip, QUESTION, loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=8,
                       max_pixels=PIXELS)
            assert ours.tokens == _generate(loaded, clip, 8)
        # Pruned: layers of two lengths; the symbolic lengths serve it without compiling again (had the
        # unpruned caches been one length in every layer, dynamo's duck sizing would have tied each
        # layer's length to layer 0's: a recompile, about a minute on an H200).
        compiled_graphs = counters["stats"]["unique_graphs"]
        pruned_cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=2))
        clip = make_clip(frames=8, seed=5)
        pruned = ask(loaded, clip, QUESTION, pruned_cfg, max_new_tokens=8, max_pixels=PIXELS)
        capacities = set(pruned.prefill.cache.capacities)
        assert len(capacities) == 2, capacities
        assert counters["stats"]["unique_graphs"] == compiled_graphs
    finally:
        loaded.use_compile(False)
    assert counters["frames"]["total"] > traced  # the steps went through dynamo
    assert pruned.tokens == ask(loaded, clip, QUESTION, pruned_cfg, max_new_tokens=8, max_pixels=PIXELS).tokens


def test_eos_stops_where_generate_stops(penalised):
    loaded = penalised("qwen2.5-vl")
    clip = make_clip(seed=2)
    free = ask(loaded, clip, QUESTION, loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=10,
               max_pixels=PIXELS).tokens
    eos = free[3]
    assert eos not in free[:3]
    gen = loaded.model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = [eos]
    try:
        stopped = ask(loaded, clip, QUESTION, loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=10,
                      max_pixels=PIXELS)
        reference = _generate(loaded, clip, 10)
    finally:
        gen.eos_token_id = saved
    assert stopped.tokens == free[:4] == reference[:4] and stopped.decoded.stop == "eos"
    assert stopped.text == loaded.processor.tokenizer.decode(free[:3], skip_special_tokens=True).strip()


def test_pruned_decode_reuses_the_pool_and_matches_a_fresh_model(tiny):
    """The second question on the same buffers (reset, not reallocated) answers like a fresh model."""
    cfg = tiny.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=2))
    clip_a, clip_b = make_clip(seed=3), make_clip(seed=4)
    ask(tiny, clip_a, QUESTION, cfg, max_new_tokens=6, max_pixels=PIXELS)
    reused = ask(tiny, clip_b, "where is the dog?", cfg, max_new_tokens=6, max_pixels=PIXELS)
    fresh = ask(load_tiny(), clip_b, "where is the dog?", cfg, max_new_tokens=6, max_pixels=PIXELS)
    assert reused.tokens == fresh.tokens
    assert reused.prefill.cache is not fresh.prefill.cache


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny, clip):
    cfg = tiny.resolve_prune(PruneConfig(method="none"))

    def run(**s):
        return ask(tiny, clip, QUESTION, cfg, max_new_tokens=8, max_pixels=PIXELS, sampling=Sampling(**s)).tokens

    greedy = run()
    assert run(temperature=1.0, top_k=1, seed=5) == greedy
    hot = run(temperature=5.0, seed=7)
    assert run(temperature=5.0, seed=7) == hot
    assert any(run(temperature=5.0, seed=s) != hot for s in (8, 9, 10))


def test_top_p_keeps_only_the_nucleus():
    from sharp_cli.sampling import Rules, pick

    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0]])  # p ~ [0.50, 0.46, 0.01, ...]
    rules = Rules(sampling=Sampling(temperature=1.0, top_p=0.9))
    torch.manual_seed(0)
    drawn = {int(pick(logits, rules)) for _ in range(300)}
    assert drawn == {0, 1}


def test_streamed_pieces_join_to_the_answer(tiny, clip):
    pieces = []
    answer = ask(tiny, clip, QUESTION, tiny.resolve_prune(PruneConfig()), max_new_tokens=10, max_pixels=PIXELS,
                 on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == answer.text


def test_text_stream_holds_back_split_characters_and_trailing_space():
    class Bytes:  # decodes byte tokens, as byte-level BPE tokenizers do
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = []
    stream = TextStream(Bytes(), pieces.append)
    for b in " caf".encode() + "é".encode() + b" ok ":
        stream.push(b)
    stream.finish()
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "café ok"
    assert not pieces[0].startswith(" ")


def test_cancel_ends_the_answer_between_tokens(tiny, clip):
    answer = ask(tiny, clip, QUESTION, tiny.resolve_prune(PruneConfig()), max_new_tokens=20, max_pixels=PIXELS,
                 cancel=lambda: True)
    assert len(answer.tokens) == 1 and answer.decoded.stop == "cancelled"


def test_generation_settings_sharp_does_not_apply_are_reported(tiny, clip, monkeypatch):
    monkeypatch.setattr(tiny.model.generation_config, "no_repeat_ngram_size", 3)
    assert "no_repeat_ngram_size" in rules_for(tiny.model).ignored
    answer = ask(tiny, clip, QUESTION, tiny.resolve_prune(PruneConfig(method="none")), max_new_tokens=2,
                 max_pixels=PIXELS)
    assert answer.extra["ignored_generation_settings"] == ["no_repeat_ngram_size"]


def test_kv_pool_reuses_buffers_and_stays_bounded():
    pool = KVPool(max_caches=3)
    first = pool.acquire([100, 40], 2, 8, torch.float32, "cpu")
    assert pool.acquire([120, 50], 2, 8, torch.float32, "cpu") is first  # same buckets, same buffers
    assert first.capacities == (BUCKET, BUCKET)
    for n in range(1, 20):
        pool.acquire([n * BUCKET + 1, 10], 2, 8, torch.float32, "cpu")
    assert len(pool) == 3 and pool.bytes_allocated() <= 3 * pool.acquire([20 * BUCKET, 10], 2, 8, torch.float32,
                                                                          "cpu").bytes_allocated()


def test_an_evicted_cache_is_freed_at_once_though_its_graphs_hold_it():
    """A captured decode graph is kept with its step, and the step holds the cache: evicting the
    cache must break that cycle, or its (GPU) buffers wait for a full garbage collection."""
    import gc
    import weakref

    pool = KVPool(max_caches=1)
    first = pool.acquire([100, 40], 2, 8, torch.float32, "cpu")
    from types import SimpleNamespace

    first.graphs["rules"] = (SimpleNamespace(cache=first), object())  # what decode._keep stores
    gone = weakref.ref(first)
    del first
    gc.disable()
    try:
        pool.acquire([5 * BUCKET, 40], 2, 8, torch.float32, "cpu")  # another size: the first is evicted
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("family", FAMILIES)
def test_many_questions_of_different_lengths_keep_memory_bounded(tiny_models, family):
    loaded = tiny_models(family)
    cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=prune_layer(loaded)))
    for frames in (2, 4, 6, 8, 10, 12):
        ask(loaded, make_clip(frames=frames, seed=frames), QUESTION, cfg, max_new_tokens=3, max_pixels=PIXELS)
    assert len(loaded.kv_pool) <= loaded.kv_pool.max_caches


def test_cache_rows_written_by_decoding(tiny, clip):
    """Each layer ends with its prefill rows plus one per step: the full prompt before K, the kept
    tokens after, every written row flagged valid and nothing beyond."""
    cfg = tiny.resolve_prune(PruneConfig(method="fastv", ratio=0.25, layer=2))
    encoded = encode(tiny, clip)
    ids = engine.prepare(tiny, clip, QUESTION, PIXELS)["input_ids"]
    state = engine.prefill(tiny, encoded, cfg, new_tokens=5)
    decoded = decode(tiny, encoded, state, 5, prompt_ids=ids, ignore_eos=True)
    steps = len(decoded.tokens) - 1
    for i, layer in enumerate(state.cache.layers):
        rows = (encoded.layout.seq_len if i < 2 else state.kept_len) + steps
        assert int(layer.valid.sum()) == rows and bool(layer.valid[:rows].all())


def test_random_weights_carry_the_checkpoints_generation_config():
    """Qwen2.5-VL-7B's shipped generation config sets a repetition penalty: a --random-weights model
    must decode with it, as the real checkpoint would (built on the meta device: no memory)."""
    from sharp_cli.models import random_init

    gen = random_init.load_generation_config("Qwen/Qwen2.5-VL-7B-Instruct")
    assert gen.repetition_penalty == 1.05 and set(gen.eos_token_id) == {151645, 151643}
    config = random_init.load_config("Qwen/Qwen2.5-VL-7B-Instruct")
    model, _ = random_init.build_random(config, device="meta", generation_config=gen)
    rules = rules_for(model)
    assert rules.repetition_penalty == 1.05 and rules.eos == {151645, 151643}


def test_kv_pool_drops_idle_caches_when_the_next_one_does_not_fit(monkeypatch):
    from sharp_cli import kv

    pool = KVPool(max_caches=4)
    kept = [pool.acquire([n * BUCKET, 10], 2, 8, torch.float32, "cpu") for n in (1, 2, 3)]
    real = kv.StaticKV
    calls = []

    def tight(*args, **kwargs):  # out of memory while other caches are held, fine once they are gone
        calls.append(len(pool))
        if len(pool) > 0:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(kv, "StaticKV", tight)
    fresh = pool.acquire([9 * BUCKET, 10], 2, 8, torch.float32, "cpu")
    assert calls == [3, 0] and len(pool) == 1 and fresh not in kept


def test_tokens_still_in_flight_when_the_steps_end_are_read(tiny, clip, monkeypatch):
    """On a GPU the host reads each token up to LAG steps behind the step that made it; when the last
    step is launched, up to LAG tokens are still in flight and must be read before decode returns.
    A reader whose tokens stay pending until the host blocks on them (a GPU that has not caught up)
    stands in for CUDA events here: every token comes back, the same as read at once."""
    from sharp_cli import decode as decode_mod

    class Pending(decode_mod._TokenReader):
        def take(self, block):
            return super().take(block=True) if block else None

    cfg = tiny.resolve_prune(PruneConfig(method="fastv", ratio=0.25, layer=2))
    ids = engine.prepare(tiny, clip, QUESTION, PIXELS)["input_ids"]

    def tokens(n):
        encoded = encode(tiny, clip)
        state = engine.prefill(tiny, encoded, cfg, new_tokens=n)
        return decode(tiny, encoded, state, n, prompt_ids=ids, ignore_eos=True).tokens

    at_once = tokens(decode_mod.LAG + 4)
    monkeypatch.setattr(decode_mod, "_TokenReader", Pending)
    assert tokens(decode_mod.LAG + 4) == at_once and len(at_once) == decode_mod.LAG + 4


def test_kv_pool_evicts_the_least_recently_used_cache_not_the_oldest():
    pool = KVPool(max_caches=2)
    first = pool.acquire([BUCKET, 10], 2, 8, torch.float32, "cpu")
    second = pool.acquire([2 * BUCKET, 10], 2, 8, torch.float32, "cpu")
    assert pool.acquire([BUCKET, 10], 2, 8, torch.float32, "cpu") is first  # used again: now the most recent
    pool.acquire([3 * BUCKET, 10], 2, 8, torch.float32, "cpu")  # a third size: one must go
    assert pool.acquire([BUCKET, 10], 2, 8, torch.float32, "cpu") is first
    assert pool.acquire([2 * BUCKET, 10], 2, 8, torch.float32, "cpu") is not second


def _tensors_left_in_cycles(work) -> list:
    """Tensors that only a garbage collection frees after work(): held by a reference cycle. In a
    server such a cycle keeps an evicted KV cache (tens of MB) allocated until a full collection."""
    import gc

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        work()
        gc.collect()
        found = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return found


@pytest.mark.parametrize("method", ["none", "sharp"])
def test_an_answer_leaves_no_tensor_in_a_reference_cycle(tiny, clip, method):
    cfg = tiny.resolve_prune(PruneConfig(method=method, ratio=0.5, layer=2))
    ask(tiny, clip, QUESTION, cfg, max_new_tokens=4, max_pixels=PIXELS)  # the pool's cache exists
    left = _tensors_left_in_cycles(lambda: ask(tiny, clip, QUESTION, cfg, max_new_tokens=4, max_pixels=PIXELS))
    assert left == [], [tuple(t.shape) for t in left]


def test_batched_answers_leave_no_tensor_in_a_reference_cycle(tiny):
    from sharp_cli.scheduler import Request, Scheduler

    reqs = [Request(make_clip(frames=2 + 2 * i, seed=i), QUESTION, tiny.resolve_prune(PruneConfig(ratio=0.5, layer=2)),
                    max_new_tokens=4, max_pixels=PIXELS, tag=i) for i in range(3)]
    left = _tensors_left_in_cycles(lambda: list(Scheduler(tiny).run(reqs)))
    assert left == [], [tuple(t.shape) for t in left]

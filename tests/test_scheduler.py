"""Continuous batching (sharp_cli/scheduler.py): many questions decoded together answer exactly as
one at a time (answer.ask), whoever they share steps with, whenever they join or leave."""

from __future__ import annotations

import pytest
import torch

from conftest import make_clip
from sharp_cli import kv
from sharp_cli.answer import ask
from sharp_cli.prune import PruneConfig
from sharp_cli.sampling import Rules, Sampling, pick, pick_rows, row_rules
from sharp_cli.scheduler import Request, Scheduler

PIXELS = 56 * 56 * 4
MIXED = [PruneConfig(method="none"), PruneConfig(method="fastv", ratio=0.25, layer=2),
         PruneConfig(method="sharp", ratio=0.5, layer=2), PruneConfig(method="sharp", ratio=0.25, layer=3)]


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch):
    """Capacities rounded to 16 rows, not 256, so that pruned layers get shorter buffers than the
    first K ones and requests of different lengths need different slots, as at real sizes."""
    monkeypatch.setattr(kv, "BUCKET", 16)


def requests(loaded, count=6, lengths=(6, 12, 3, 9, 1, 7), frames=(2, 8, 6, 10, 2, 8), **extra):
    return [Request(make_clip(frames=frames[i % len(frames)], seed=i), f"what happens in part {i}?",
                    loaded.resolve_prune(MIXED[i % len(MIXED)]), max_new_tokens=lengths[i % len(lengths)],
                    max_pixels=PIXELS, tag=i, **extra) for i in range(count)]


def answered(loaded, reqs, **kwargs):
    scheduler = Scheduler(loaded, **kwargs)
    done = {d.request.tag: d for d in scheduler.run(reqs)}
    for d in done.values():
        if d.error is not None:
            raise d.error
    return scheduler, {tag: d.answer for tag, d in done.items()}


def one_at_a_time(loaded, request):
    return ask(loaded, request.clip, request.question, request.cfg, max_new_tokens=request.max_new_tokens,
               max_pixels=PIXELS, sampling=request.sampling)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava-onevision"])
def test_greedy_answers_equal_one_at_a_time_with_joins_leaves_and_mixed_pruning(penalised, family):
    loaded = penalised(family)
    reqs = requests(loaded)
    # An EOS the model says mid-answer in one of them, so that answers also leave early.
    free = one_at_a_time(loaded, reqs[1]).tokens
    eos = next(t for t in free[2:] if t not in free[:2])
    gen = loaded.model.generation_config
    saved, gen.eos_token_id = gen.eos_token_id, [eos]
    pieces = {r.tag: [] for r in reqs}
    for r in reqs:
        r.on_text = pieces[r.tag].append
    try:
        scheduler, batched = answered(loaded, reqs, max_batch=3)
        alone = {r.tag: one_at_a_time(loaded, r) for r in reqs}
    finally:
        gen.eos_token_id = saved
    for r in reqs:
        assert batched[r.tag].tokens == alone[r.tag].tokens, r.tag
        assert batched[r.tag].decoded.stop == alone[r.tag].decoded.stop
        assert batched[r.tag].text == alone[r.tag].text == "".join(pieces[r.tag])
    assert any(a.decoded.stop == "eos" for a in batched.values())
    assert any(a.decoded.stop == "length" and len(a.tokens) > 1 for a in batched.values())
    # It did batch: three at a time, later requests joining as earlier ones left, and sequences of
    # different pruned lengths shared steps (layers of one slot hold different row counts).
    assert scheduler.stats["most_in_flight"] == 3 and scheduler.stats["joined"] == len(reqs)
    assert max(a.extra["decode_batch"] for a in batched.values()) == 3
    assert len({a.prefill.kept_len for a in batched.values()}) > 2
    assert len(set(scheduler.slots.cache.capacities)) > 1


def test_slots_grow_for_a_longer_request_without_disturbing_the_live_ones(penalised):
    loaded = penalised("qwen2.5-vl")
    reqs = requests(loaded, count=3, lengths=(10, 10, 10), frames=(2, 4, 12))
    scheduler, batched = answered(loaded, reqs, max_batch=4)
    assert scheduler.stats["resized"] >= 1 and scheduler.stats["most_in_flight"] == 3
    for r in reqs:
        assert batched[r.tag].tokens == one_at_a_time(loaded, r).tokens


def test_a_seeded_sampled_request_draws_the_same_tokens_whoever_shares_its_steps(penalised):
    loaded = penalised("qwen2.5-vl")
    def sampled(seed=7, **sampling):
        return Request(make_clip(frames=6, seed=11), "what is sampled here?",
                       loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=10, max_pixels=PIXELS,
                       sampling=Sampling(**{"temperature": 5.0, "seed": seed, **sampling}), tag="hot")

    _, alone = answered(loaded, [sampled()], max_batch=1)
    others = requests(loaded, count=3, lengths=(4, 10, 6))
    others[1].sampling = Sampling(temperature=5.0, seed=99)
    _, crowded = answered(loaded, [others[0], others[1], sampled(), others[2]], max_batch=4)
    assert crowded["hot"].tokens == alone["hot"].tokens
    assert crowded[1].tokens != alone["hot"].tokens
    _, reseeded = answered(loaded, [sampled(seed=s) for s in (8, 9)], max_batch=2)
    assert reseeded["hot"].tokens != alone["hot"].tokens
    # top_k = 1 leaves one token to draw: the greedy answer, in a batch with sampled rows.
    greedy = one_at_a_time(loaded, Request(make_clip(frames=6, seed=11), "what is sampled here?",
                                           loaded.resolve_prune(PruneConfig(method="none")), max_new_tokens=10))
    _, narrow = answered(loaded, [sampled(top_k=1), others[1]], max_batch=2)
    assert narrow["hot"].tokens == greedy.tokens


def test_cancelling_one_request_leaves_the_others_tokens_unchanged(penalised):
    loaded = penalised("llava-onevision")
    reqs = requests(loaded, count=3, lengths=(10, 10, 10))
    _, full = answered(loaded, requests(loaded, count=3, lengths=(10, 10, 10)), max_batch=3)
    pieces = []
    reqs[1].on_text = pieces.append
    reqs[1].cancel = lambda: len(pieces) >= 2  # the client leaves once it has read two pieces
    _, cut = answered(loaded, reqs, max_batch=3)
    assert cut[1].decoded.stop == "cancelled" and 1 < len(cut[1].tokens) < len(full[1].tokens)
    assert cut[1].tokens == full[1].tokens[:len(cut[1].tokens)]
    assert cut[0].tokens == full[0].tokens and cut[2].tokens == full[2].tokens


def test_a_failing_request_is_reported_and_the_others_are_answered(penalised):
    loaded = penalised("qwen2.5-vl")
    reqs = requests(loaded, count=3, lengths=(4, 4, 4))
    reqs[1].question = "   "  # refused before the model runs
    scheduler = Scheduler(loaded, max_batch=2)
    done = {d.request.tag: d for d in scheduler.run(reqs)}
    assert "the question is empty" in str(done[1].error) and done[1].answer is None
    assert done[0].answer.tokens == one_at_a_time(loaded, reqs[0]).tokens
    assert done[2].answer.tokens == one_at_a_time(loaded, reqs[2]).tokens


def test_the_kv_budget_bounds_the_sequences_in_flight_and_pruned_ones_fit_more(penalised):
    from sharp_cli import engine
    from sharp_cli.answer import begin
    from sharp_cli.kv_slots import SlotKV, bucketed

    loaded = penalised("qwen2.5-vl")
    dims, unpruned_cfg = loaded.dims, loaded.resolve_prune(PruneConfig(method="none"))
    clip = make_clip(frames=16, seed=0)
    begun = begin(loaded, clip, "how many?", unpruned_cfg, max_new_tokens=6, max_pixels=PIXELS)
    need = bucketed(engine.cache_lengths(loaded, begun.encoded, unpruned_cfg, 6))
    unpruned_slot = SlotKV.slot_bytes(need, dims["kv_heads"], dims["head_dim"], torch.float32)

    def most_in_flight(cfg):
        reqs = [Request(make_clip(frames=16, seed=i), "how many?", cfg, max_new_tokens=6, max_pixels=PIXELS, tag=i)
                for i in range(8)]
        scheduler, _ = answered(loaded, reqs, max_batch=8, kv_bytes=3 * unpruned_slot)  # 3 unpruned slots
        return scheduler.stats["most_in_flight"]

    assert most_in_flight(unpruned_cfg) == 3
    # Pruned at layer 1 to a quarter of the visual tokens, a slot is about 0.6 of an unpruned one.
    assert most_in_flight(loaded.resolve_prune(PruneConfig(method="fastv", ratio=0.25, layer=1))) >= 5


def test_rows_with_their_own_rules_pick_as_pick_does_row_by_row():
    """pick_rows against pick(), one row at a time: each row's own penalty (1.0, 1.3, 0.8) over its
    own seen tokens; a sampled row with top_k=1 is the greedy token; top-p keeps the nucleus."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.rand(3, 50) < 0.3
    table = row_rules(3, "cpu")
    for row, penalty in enumerate((1.0, 1.3, 0.8)):
        table.set(row, Rules(repetition_penalty=penalty), seed=row)
    counter = torch.zeros(3, dtype=torch.long)
    got = pick_rows(logits, table, seen, counter, sample=False)
    for row, penalty in enumerate((1.0, 1.3, 0.8)):
        want = pick(logits[row:row + 1], Rules(repetition_penalty=penalty), seen[row:row + 1])
        assert int(got[row]) == int(want)
    table.set(1, Rules(repetition_penalty=1.3, sampling=Sampling(temperature=2.0, top_k=1)), seed=5)
    assert torch.equal(pick_rows(logits, table, seen, counter, sample=True), got)
    nucleus = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0]])  # p ~ [0.50, 0.46, 0.01, ...]
    one = row_rules(1, "cpu")
    one.set(0, Rules(sampling=Sampling(temperature=1.0, top_p=0.9)), seed=3)
    none_seen = torch.zeros(1, 5, dtype=torch.bool)
    drawn = {int(pick_rows(nucleus, one, none_seen, torch.tensor([i]), sample=True)) for i in range(300)}
    assert drawn == {0, 1}

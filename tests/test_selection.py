"""The selection rules on crafted inputs (CPU, no model, except one layer for the host-sync check):
the shared tie-break and its audit, selection that reads nothing back to the host, EVS, the options'
checks and the selection invariants. Debiasing, registers and deduplication (sharp_cli/prune/sharp.py)
are in tests/test_prune_sharp.py."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import grid_layout, run_sharp
from sharp_cli.errors import UsageError
from sharp_cli.prune import PruneConfig, keep_count, rank
from sharp_cli.prune.baselines import FIRST_FRAME, evs_scores, select_evs, select_fastv, select_random
from sharp_cli.prune.sharp import query_rows, question_attention, select_sharp

OFF = dict(debias="none", dedup=False, registers=False)  # sharp with no correction: scores only


# -- ties: a seeded, content-free permutation decides, never the index order ------------------------
@pytest.mark.parametrize("method", ["fastv", "sharp", "sharp, all components", "evs"])
def test_equal_scores_keep_a_seeded_set_not_the_index_order(method):
    """All-equal scores: the kept set is neither the first nor the last k tokens, is the same for
    the same seed and differs between seeds, whichever score-based method ranks them."""
    grid, n = (8, 4, 4), 128
    k = keep_count(0.25, n)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 16, generator=gen)  # no two alike: dedup skips nothing

    def kept(seed):
        if method == "fastv":
            return select_fastv(torch.full((n,), 0.5), 0.25, seed)[0]
        if method == "evs":  # a static video: every token after the first frame unchanged
            frame = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
            embeds = frame.repeat(8, 1)
            return select_evs(embeds, grid, 0.25, seed)[0]
        log_attention = torch.full((2, 3, n), math.log(0.4 / n))
        options = OFF if method == "sharp" else dict(registers=True, dedup=True)
        prior = torch.full((2, n), 1.0 / n)
        return run_sharp(log_attention, hidden, grid, prior, ratio=0.25, seed=seed, **options)[0]

    sets = [tuple(kept(seed).tolist()) for seed in range(5)]
    assert all(len(s) == k for s in sets)
    if method == "evs":  # the first token frame (16 tokens) ranks first; the other 16 are drawn
        assert all(set(range(16)) <= set(s) for s in sets)
        assert all(set(s) != set(range(32)) for s in sets)
    else:
        assert all(s != tuple(range(k)) and s != tuple(range(n - k, n)) for s in sets)
    assert len(set(sets)) == 5
    assert tuple(kept(3).tolist()) == sets[3]


def test_rank_orders_by_score_then_by_the_seeded_permutation():
    """Reference: Python's sort on (-score, place in the seed's permutation)."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 5, (40,), generator=gen).float()  # five values, many ties
    for seed in (0, 7):
        perm = rank.tie_break(40, seed, "cpu").tolist()
        place = {token: i for i, token in enumerate(perm)}
        expected = sorted(range(40), key=lambda j: (-float(scores[j]), place[j]))
        assert rank.rank(scores, seed).tolist() == expected
    assert rank.tie_break(40, 0, "cpu").tolist() != list(range(40))


def test_torch_topk_decides_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.topk's order on equal values must not pick tokens")

    monkeypatch.setattr(torch, "topk", refuse)
    monkeypatch.setattr(torch.Tensor, "topk", refuse)
    n = 64
    select_fastv(torch.rand(n), 0.2)
    select_evs(torch.randn(n, 8), (4, 4, 4), 0.2)
    for mode in ("divide", "divide-mean", "subtract", "none"):
        run_sharp(torch.randn(2, 1, n).log_softmax(-1), torch.randn(n, 8), (4, 4, 4), torch.rand(2, n), debias=mode)


def test_tie_share_counts_kept_tokens_tied_with_the_next_one():
    scores = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0])
    kept, ties = rank.top(scores, 3, seed=0)
    assert kept[:2].tolist() == [0, 1] and kept[2].item() in (2, 3, 4)
    assert ties.dim() == 0 and ties.item() == pytest.approx(1 / 3)
    assert rank.top(torch.full((10,), 2.0), 4, 0)[1].item() == 1.0
    assert rank.top(torch.arange(10.0), 4, 0)[1].item() == 0.0
    assert rank.top(torch.full((10,), 2.0), 10, 0)[1].item() == 0.0  # everything kept: nothing decided
    assert select_fastv(torch.full((20,), 1.0), 0.5)[1]["tie_share"].item() == 1.0


def test_random_keeps_using_its_seed():
    a, b = select_random(100, 0.2, 3), select_random(100, 0.2, 3)
    assert torch.equal(a, b) and not torch.equal(a, select_random(100, 0.2, 4))
    assert a.tolist() == sorted(a.tolist()) and len(set(a.tolist())) == 20


def test_selection_reads_nothing_back_to_the_host(tiny_models):
    """On the GPU, one value read back (.item(), int(), a bool mask's nonzero) would stall the CPU
    until layers 0..K-1 finish. Meta tensors have no values at all: any such read raises. Scoring
    (layer K's query rows), every debias mode, registers, dedup, fastv, evs and random."""
    meta = torch.device("meta")
    t, h, w = 4, 3, 3
    n = t * h * w
    layout = grid_layout(t, h, w)
    log_attention = torch.randn(2, 3, n, device=meta)
    prior = torch.rand(2, n, device=meta)
    hidden = torch.randn(n, 8, device=meta)
    for mode in ("divide", "divide-mean", "subtract", "none"):
        kept, details = select_sharp(log_attention, prior, hidden, layout, PruneConfig(ratio=0.3, debias=mode))
        assert kept.device == meta and kept.shape == (keep_count(0.3, n),) and details["tie_share"].shape == ()
    assert select_fastv(torch.rand(n, device=meta), 0.3)[0].device == meta
    assert select_evs(hidden, (t, h, w), 0.3)[0].device == meta
    assert select_random(n, 0.3, 0, meta).device == meta
    tiny = tiny_models("qwen2.5-vl")
    layer = copy.deepcopy(tiny.adapter.decoder_layers(tiny.model)[2]).to(meta)
    length, dim = 50, tiny.model.config.text_config.hidden_size
    indices = torch.arange(10, 10 + n, device=meta)
    seq = SimpleNamespace(seq_len=length, indices=indices, question=(48, 50), visual_end=10 + n)
    head_dim = layer.self_attn.head_dim
    cos = torch.ones(1, length, head_dim, device=meta)  # what the text model hands its layers
    for mode in ("last", "text"):
        out = question_attention(layer, tiny.adapter.rope(layer), torch.randn(1, length, dim, device=meta),
                                 (cos, cos * 0), seq, query_rows(seq, mode))
        assert out.device == meta and out.shape[-1] == n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU check of the meta test above")
def test_selection_never_synchronizes_on_cuda(tiny_models):
    """On a GPU: any synchronizing call (a value read back, a pageable copy) raises in this mode.
    Run with: pytest tests/test_selection.py -k synchronizes (on a machine with CUDA)."""
    cuda = torch.device("cuda")
    tiny = tiny_models("qwen2.5-vl")
    layer = copy.deepcopy(tiny.adapter.decoder_layers(tiny.model)[2]).to(cuda)
    length, dim = 50, tiny.model.config.text_config.hidden_size
    seq = SimpleNamespace(seq_len=length, indices=torch.arange(10, 40, device=cuda), question=(48, 50), visual_end=40)
    cos = torch.ones(1, length, layer.self_attn.head_dim, device=cuda)
    hidden_seq = torch.randn(1, length, dim, device=cuda)
    rows = {mode: query_rows(seq, mode) for mode in ("last", "text")}
    t, h, w = 8, 6, 6
    n = t * h * w
    layout = grid_layout(t, h, w)
    log_attention = torch.randn(4, 3, n, device=cuda).log_softmax(-1)
    prior, hidden = torch.rand(4, n, device=cuda), torch.randn(n, 32, device=cuda)
    scores = torch.rand(n, device=cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            for mode in ("last", "text"):
                question_attention(layer, tiny.adapter.rope(layer), hidden_seq, (cos, cos * 0), seq, rows[mode])
        for mode in ("divide", "divide-mean", "subtract", "none"):
            select_sharp(log_attention, prior, hidden, layout, PruneConfig(ratio=0.3, debias=mode, dedup_window=2))
        select_fastv(scores, 0.3)
        select_evs(hidden, (t, h, w), 0.3)
        select_random(n, 0.3, 0, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- EVS -------------------------------------------------------------------------------------------
def test_evs_scores_are_the_change_since_the_previous_token_frame():
    gen = torch.Generator().manual_seed(5)
    embeds = torch.randn(3 * 4, 6, generator=gen)
    got = evs_scores(embeds, (3, 2, 2)).view(3, 4)
    x = embeds.double().numpy().reshape(3, 4, 6)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(got[1:].numpy(), 1 - (x[1:] * x[:-1]).sum(-1), rtol=1e-5, atol=1e-6)
    assert (got[0] == FIRST_FRAME).all() and FIRST_FRAME > 2  # above any 1 - cosine


def test_new_options_are_checked():
    for bad, flag in [(dict(debias_strength=-1), "--debias-strength"), (dict(register_ratio=1.0), "--register-ratio"),
                      (dict(debias="divided"), "--debias"), (dict(method="evs2"), "unknown method")]:
        with pytest.raises(UsageError, match=flag):
            replace(PruneConfig(), **bad).validate()
    assert PruneConfig(method="evs", layer=5).validate(num_layers=4).layer == 5  # evs ignores --layer


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), ratio=st.floats(0.001, 1.0), seed=st.integers(0, 10_000))
def test_selection_invariants(n, ratio, seed):
    k = keep_count(ratio, n)
    assert 1 <= k <= n
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen)
    flagged = torch.rand(n, generator=gen) < 0.3
    order = rank.rank(scores, seed)
    for kept in (select_fastv(scores, ratio, seed)[0], select_random(n, ratio, seed),
                 rank.first_unskipped(order, flagged, k)):
        values = kept.tolist()
        assert len(values) == k and values == sorted(set(values)) and 0 <= values[0] and values[-1] < n
    refill = set(rank.first_unskipped(order, flagged, k).tolist())
    unflagged = int((~flagged).sum())
    if k <= unflagged:  # flagged tokens are used only when the unflagged ones run out
        assert not any(flagged[i] for i in refill)
    else:
        assert sum(1 for i in refill if not flagged[i]) == unflagged  # every unflagged one is kept

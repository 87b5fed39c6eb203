"""The selection rules on crafted inputs (CPU, no model, except one layer for the host-sync check):
the shared tie-break and its audit, debiasing per head, registers, greedy deduplication, EVS."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sharp_cli.errors import UsageError
from sharp_cli.prune import PruneConfig, keep_count, rank
from sharp_cli.prune.baselines import FIRST_FRAME, evs_scores, select_evs, select_fastv, select_random
from sharp_cli.prune.sharp import (debias, find_duplicates, find_registers, head_mean, prior_from,
                                   question_attention, query_rows, select_sharp)

OFF = dict(debias="none", dedup=False, registers=False)  # sharp with no correction: scores only


def _layout(t, h, w):
    return SimpleNamespace(grid=(t, h, w), num_visual=t * h * w)


def _sharp(log_attention, hidden, grid, prior=None, **kw):
    return select_sharp(log_attention, prior, hidden, _layout(*grid), PruneConfig(**kw))


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
        return _sharp(log_attention, hidden, grid, prior, ratio=0.25, seed=seed, **options)[0]

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
        _sharp(torch.randn(2, 1, n).log_softmax(-1), torch.randn(n, 8), (4, 4, 4), torch.rand(2, n), debias=mode)


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
    layout = _layout(t, h, w)
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
    layout = _layout(t, h, w)
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


# -- debiasing: per head and row, in log space ----------------------------------------------------
H, R, T, C, TEXT = 4, 2, 8, 16, 16
N = T * C


def _attention(content, bias, leak=0.0):
    """Log attention (H, R, N) over the visual keys of rows whose logits are [text | content + bias],
    with `leak` of every row's attention spread evenly over all keys (a content-free part the black
    video does not show)."""
    gen = torch.Generator().manual_seed(11)
    text = torch.randn(H, R, TEXT, generator=gen) + 2.0
    logits = torch.cat([text, content + bias.unsqueeze(1)], dim=-1)
    if not leak:
        return logits.log_softmax(-1)[..., TEXT:]
    probs = (1 - leak) * logits.softmax(-1) + leak / logits.shape[-1]
    return probs.log()[..., TEXT:]


def _bias(gain):
    """A recency slope and an end-frame sink, different in every head (one favours early frames)."""
    frame = torch.arange(N) // C
    slope = torch.tensor([1.5, 0.5, 2.5, -1.0]).view(-1, 1)
    sink = torch.tensor([2.0, 0.0, 3.0, 0.5]).view(-1, 1)
    return gain * (slope * frame / (T - 1) + sink * (frame == T - 1))


def _content():
    """(H, R, N) content logits: shared needles, plus what each head sees on its own."""
    gen = torch.Generator().manual_seed(0)
    needles = torch.randperm(N, generator=gen)[:6]
    shared = torch.randn(N, generator=gen) * 0.7
    shared[needles] += 4.0
    return shared + torch.randn(H, 1, N, generator=gen) + 0.2 * torch.randn(H, R, N, generator=gen), needles


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_divide_removes_each_heads_own_bias_exactly():
    """Independent reference: each row's content distribution softmax(c_hr) over the visual tokens,
    averaged with the row's attention mass on the video as weight. Dividing after averaging the
    heads (divide-mean, the earlier rule) is not exact when heads are biased differently."""
    content, _ = _content()
    for gain in (1.0, 3.0):
        scores = _attention(content, _bias(gain))
        prior = prior_from(_attention(torch.zeros(H, R, N), _bias(gain)))
        mass = scores.exp().sum(-1, keepdim=True)
        expected = (mass * content.softmax(-1)).sum(dim=(0, 1)) / mass.sum()
        got = debias(scores, prior, PruneConfig(debias_floor=1e-12))
        torch.testing.assert_close(got.exp(), expected, rtol=1e-4, atol=1e-9)
        mean_rule = debias(scores, prior, PruneConfig(debias="divide-mean", debias_floor=1e-12))
        assert _spearman(mean_rule, expected) < 0.99


def test_as_the_bias_grows_dividing_per_head_recovers_the_ranking_best():
    """The injected bias of the issue (a per-head recency slope and an end-frame sink, added to the
    content logits), with a 1% attention leak the black video does not show. The unbiased ranking
    is the content's own scores; per gain, the default rule has the highest rank correlation with it
    and the best needle recall at k = 12; without correction the needles fall out."""
    content, needles = _content()
    unbiased = head_mean(_attention(content, torch.zeros(H, N), leak=0.01))
    rules = {"divide": PruneConfig(), "divide-mean": PruneConfig(debias="divide-mean"),
             "subtract": PruneConfig(debias="subtract"), "none": PruneConfig(debias="none")}
    curves = {name: [] for name in rules}
    for gain in (0.5, 1.0, 2.0, 4.0):
        scores = _attention(content, _bias(gain), leak=0.01)
        prior = prior_from(_attention(torch.zeros(H, R, N), _bias(gain)))
        for name, cfg in rules.items():
            ranked = debias(scores, prior, cfg)
            recall = np.isin(needles.numpy(), rank.rank(ranked, 0)[:12].numpy()).mean()
            curves[name].append((_spearman(ranked, unbiased), recall))
    for i in range(4):
        best = curves["divide"][i]
        for name in ("divide-mean", "subtract", "none"):
            assert best[0] > curves[name][i][0], (i, name, curves)
            assert best[1] >= curves[name][i][1], (i, name, curves)
    assert curves["divide"][-1][1] == 1.0 and curves["none"][-1][1] < 1.0
    assert PruneConfig().debias == "divide" and PruneConfig().debias_strength == 1.0


def test_the_floor_bounds_what_a_never_attended_position_gains():
    """A position the black video gives 0 attention is lifted at most (1 + f) / f times over one at
    the uniform share, so a small leak there stays below real content. Without the floor the log
    of 0 would put the leak first."""
    n = 50
    prior = torch.full((1, n), 1.0 / (n - 10))
    prior[0, 40:] = 0.0  # the black video never looks at the last ten positions
    probs = torch.full((n,), 0.8 / n)
    probs[40:] = 0.01 / n  # a small leak
    probs[7] = 0.1  # content
    log_attention = probs.log().view(1, 1, n)
    cfg = PruneConfig()
    ranked = debias(log_attention, prior, cfg)
    assert int(ranked.argmax()) == 7
    assert set(rank.rank(ranked, 0)[:5].tolist()).isdisjoint(range(40, 50))
    equal = torch.full((1, 1, 2), math.log(0.5))
    lifted = debias(equal, torch.tensor([[0.0, 1.0]]), cfg)  # n = 2: uniform share 1/2
    f = cfg.debias_floor
    assert float((lifted[0] - lifted[1]).exp()) == pytest.approx((2 + f) / f, rel=1e-5)  # (p + f/N) / (f/N)
    with pytest.raises(UsageError, match="--debias-floor"):
        PruneConfig(debias_floor=0).validate()


def test_strength_zero_is_the_plain_head_average():
    content, _ = _content()
    scores = _attention(content, _bias(2.0))
    prior = prior_from(_attention(torch.zeros(H, R, N), _bias(2.0)))
    off = debias(scores, prior, PruneConfig(debias_strength=0.0)).exp()
    plain = head_mean(scores)
    torch.testing.assert_close(off / off.sum(), plain / plain.sum(), rtol=1e-5, atol=1e-9)
    assert not torch.allclose(debias(scores, prior, PruneConfig()).exp(), off)


def test_prior_is_per_head_with_rows_averaged_in_log_space():
    gen = torch.Generator().manual_seed(2)
    log_attention = torch.randn(3, 4, 10, generator=gen).log_softmax(-1) - 1.0  # a third on the video
    prior = prior_from(log_attention)
    geometric = log_attention.exp().prod(dim=1) ** (1 / 4)
    torch.testing.assert_close(prior, geometric / geometric.sum(-1, keepdim=True))
    assert prior.shape == (3, 10)


# -- registers: massive activations, not a few MADs -----------------------------------------------
def _unit_rows(n, dim, seed):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_a_register_among_the_top_scores_is_not_kept():
    n, grid = 64, (4, 4, 4)
    hidden = _unit_rows(n, 16, 0)
    hidden[5] *= 50  # a massive activation
    probs = torch.full((n,), 0.5 / n)
    probs[[5, 9, 20]] = 0.1
    log_attention = probs.log().view(1, 1, n)
    kept, details = _sharp(log_attention, hidden, grid, ratio=0.125, debias="none", dedup=False, registers=True)
    assert details["registers"].nonzero().flatten().tolist() == [5]
    assert 5 not in kept.tolist() and {9, 20} <= set(kept.tolist()) and kept.numel() == 8
    kept_off, _ = _sharp(log_attention, hidden, grid, ratio=0.125, debias="none", dedup=False, registers=False)
    assert 5 in kept_off.tolist()


def test_a_slightly_brighter_content_token_is_kept():
    """On a uniform background every norm is nearly equal, so a robust z-score calls a token 7%
    brighter an outlier (the median absolute deviation is tiny); the norm ratio does not."""
    n, grid = 64, (4, 4, 4)
    hidden = _unit_rows(n, 16, 1) * (1 + 0.001 * torch.randn(n, 1, generator=torch.Generator().manual_seed(3)))
    hidden[9] *= 1.07
    norms = hidden.norm(dim=-1)
    mad = (norms - norms.median()).abs().median()
    assert (norms[9] - norms.median()) / (1.4826 * mad) > 8  # the old rule's outlier
    probs = torch.full((n,), 0.5 / n)
    probs[9] = 0.2
    kept, details = _sharp(probs.log().view(1, 1, n), hidden, grid, ratio=0.125, debias="none", dedup=False)
    assert not details["registers"].any() and 9 in kept.tolist()
    assert find_registers(hidden, 10.0).sum() == 0 and find_registers(hidden * torch.where(
        torch.arange(n) == 3, 11.0, 1.0).view(-1, 1), 10.0).nonzero().flatten().tolist() == [3]


# -- dedup: greedy over the ranking -----------------------------------------------------------------
def _angles(degrees):
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_dedup_chain_keeps_the_token_whose_only_duplicate_was_skipped():
    """A ~ B and B ~ C but A not ~ C (cosines 0.94, 0.94, 0.77), ranked A > B > C in one column of
    three token frames: B is skipped for A, and C, whose only near duplicate is B, is kept."""
    hidden = _angles([0, 20, 40])
    order = torch.tensor([0, 1, 2])
    for window in (1, 2):
        skipped = find_duplicates(hidden, order, _layout(3, 1, 1), 0.9, window)
        assert skipped.tolist() == [False, True, False]
    log_attention = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    kept, _ = _sharp(log_attention, hidden, (3, 1, 1), ratio=0.67, debias="none", registers=False)
    assert kept.tolist() == [0, 2]


def test_dedup_skips_only_for_a_kept_neighbour():
    """A is a register, so it is never kept: B, its near duplicate, is kept; C is then B's."""
    hidden = _angles([0, 5, 10])
    hidden[0] *= 100
    never = torch.tensor([True, False, False])
    skipped = find_duplicates(hidden, torch.tensor([0, 1, 2]), _layout(3, 1, 1), 0.9, 2, never)
    assert skipped.tolist() == [False, False, True]
    lower_first = find_duplicates(hidden[[2, 1, 0]], torch.tensor([0, 1, 2]), _layout(3, 1, 1), 0.9, 2)
    assert lower_first.tolist() == [False, True, True]  # the best-ranked of a run is the one kept


def test_dedup_window_and_spatial_position():
    hidden = torch.ones(6, 4)  # (3 frames, 1 row, 2 columns), all alike
    hidden[:, 1] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # the two columns differ
    order = torch.tensor([0, 1, 4, 5, 2, 3])  # frames 0 and 2 before frame 1
    near = find_duplicates(hidden, order, _layout(3, 1, 2), 0.9, window=1)
    assert near.tolist() == [False, False, True, True, False, False]  # frame 2 is 2 frames from frame 0
    far = find_duplicates(hidden, order, _layout(3, 1, 2), 0.9, window=2)
    assert far.tolist() == [False, False, True, True, True, True]
    assert not find_duplicates(hidden[[0, 1]], torch.tensor([0, 1]), _layout(1, 1, 2), 0.9, 1).any()  # columns


def test_dedup_keeps_exactly_k_refilling_in_rank_order():
    """A static scene ranked frame by frame: with window 1 the walk keeps every other token frame
    (a skipped token suppresses nothing), then refills from the skipped ones by rank."""
    hidden = torch.ones(8, 4)  # (4 frames, 1 row, 2 columns), all identical
    scores = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    log_attention = (scores / scores.sum()).log().view(1, 1, 8)
    kept, details = _sharp(log_attention, hidden, (4, 1, 2), ratio=0.875, debias="none", registers=False)
    assert details["duplicates"].tolist() == [False, False, True, True, False, False, True, True]
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6]  # four unskipped, then skipped 2, 3, 6 by rank
    wide, _ = _sharp(log_attention, hidden, (4, 1, 2), ratio=0.5, debias="none", registers=False, dedup_window=3)
    assert wide.tolist() == [0, 1, 2, 3]  # one of each column unskipped, the rest by rank


def _greedy_reference(hidden, scores, grid, threshold, window, k, never):
    """A plain walk: tokens from the best score down, skip one with a kept token of its column within
    `window` frames above `threshold`, stop at k; then the skipped ones by score."""
    t, h, w = grid
    feats = torch.nn.functional.normalize(hidden.float(), dim=-1)
    kept, skipped = [], []
    for j in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        if len(kept) == k:
            break
        if never[j]:
            skipped.append(j)
            continue
        frame, column = divmod(j, h * w)
        if any(abs(i // (h * w) - frame) <= window and i % (h * w) == column
               and float(feats[i] @ feats[j]) > threshold for i in kept):
            skipped.append(j)
        else:
            kept.append(j)
    return sorted(kept + skipped[: k - len(kept)])


@pytest.mark.parametrize("seed", range(6))
def test_dedup_equals_a_plain_greedy_walk(seed):
    gen = torch.Generator().manual_seed(seed)
    grid = (6, 2, 3)
    n = 36
    base = torch.randn(6, 8, generator=gen)  # one pattern per spatial position, drifting over time
    hidden = base.repeat(6, 1) + 0.35 * torch.randn(n, 8, generator=gen)
    hidden[int(torch.randint(n, (1,), generator=gen))] *= 40
    scores = torch.rand(n, generator=gen)
    window, threshold = 1 + seed % 3, 0.8
    for ratio in (0.2, 0.5, 0.9):
        cfg = PruneConfig(ratio=ratio, debias="none", dedup_threshold=threshold, dedup_window=window)
        kept, details = select_sharp((scores / scores.sum()).log().view(1, 1, n), None, hidden, _layout(*grid), cfg)
        expected = _greedy_reference(hidden, scores, grid, threshold, window, keep_count(ratio, n),
                                     details["registers"])
        assert kept.tolist() == expected


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

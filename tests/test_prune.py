"""Correctness of pruning on tiny random models (CPU): identities, positions, caches, components."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, encode, make_clip, prune_layer
from sharp_cli import engine
from sharp_cli.answer import ask
from sharp_cli.decode import decode
from sharp_cli.prune import PruneConfig, keep_count
from sharp_cli.prune import attention as seg
from sharp_cli.prune.prior import PriorStore
from sharp_cli.prune.sharp import (debias, find_duplicates, find_registers, question_attention, query_rows,
                                   select_sharp, select_with_refill)

PLAIN = dict(segment_mask=False, debias="none", dedup=False)


def _prefill(loaded, encoded, **kw):
    cfg = loaded.adapter.validate_prune(PruneConfig(**kw), loaded.num_layers)
    return engine.prefill(loaded, encoded, cfg)


def _text_model_forward(loaded, encoded, **kw):
    """The unmodified text model on the whole sequence (DeepStack kwargs included), for references."""
    text = loaded.adapter.text_model(loaded.model)
    return text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False,
                **encoded.extra, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_and_prefill_equal_the_models_own_forward(tiny_models, clip, family):
    """Our vision encoding, embedding, positions (and DeepStack / newline) are the model's own."""
    loaded = tiny_models(family)
    inputs = engine.prepare(loaded, clip, "what colour is the ball?", 56 * 56 * 4)
    encoded, _ = engine.encode(loaded, inputs)
    ours = _prefill(loaded, encoded, method="none")
    with torch.inference_mode():
        ref = loaded.model(**inputs).logits[:, -1:]
    torch.testing.assert_close(ours.logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sharp", "fastv"])
def test_ratio_one_without_components_is_the_unpruned_model(tiny_models, clip, method, family):
    loaded = tiny_models(family)
    encoded = encode(loaded, clip)
    base = _prefill(loaded, encoded, method="none")
    kw = PLAIN if method == "sharp" else {}
    pruned = _prefill(loaded, encoded, method=method, ratio=1.0, layer=prune_layer(loaded), **kw)
    assert pruned.kept.numel() == encoded.layout.num_visual
    assert torch.equal(pruned.logits, base.logits)


def test_segment_mask_changes_the_early_layers(tiny, clip):
    encoded = encode(tiny, clip)
    base = _prefill(tiny, encoded, method="none")
    masked = _prefill(tiny, encoded, method="sharp", ratio=1.0, layer=2, segment_mask=True, debias="none", dedup=False)
    assert not torch.allclose(masked.logits, base.logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sharp", "fastv", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.5])
def test_kept_set_is_exact_sorted_unique_in_range(tiny_models, clip, method, ratio, family):
    loaded = tiny_models(family)
    encoded = encode(loaded, clip)
    n = encoded.layout.num_visual
    out = _prefill(loaded, encoded, method=method, ratio=ratio, layer=prune_layer(loaded))
    kept = out.kept.tolist()
    assert len(kept) == keep_count(ratio, n) == max(1, int(ratio * n + 0.5))
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < n
    text_tokens = encoded.layout.seq_len - n
    assert out.kept_len == text_tokens + len(kept)


def test_random_is_deterministic_per_seed(tiny, clip):
    encoded = encode(tiny, clip)
    a = _prefill(tiny, encoded, method="random", ratio=0.25, seed=7).kept
    b = _prefill(tiny, encoded, method="random", ratio=0.25, seed=7).kept
    c = _prefill(tiny, encoded, method="random", ratio=0.25, seed=8).kept
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_is_short_from_layer_k(tiny_models, clip, family):
    loaded = tiny_models(family)
    encoded = encode(loaded, clip)
    k = prune_layer(loaded)
    out = _prefill(loaded, encoded, method="fastv", ratio=0.25, layer=k)
    lengths = [layer.length for layer in out.cache.layers]
    assert [int(layer.valid.sum()) for layer in out.cache.layers] == lengths  # rows written = rows valid
    assert lengths[:k] == [encoded.layout.seq_len] * k
    assert lengths[k:] == [out.kept_len] * (len(lengths) - k)
    layers = len(lengths)
    assert out.kv_cache_bytes / out.kv_cache_bytes_unpruned == pytest.approx(
        (k * encoded.layout.seq_len + (layers - k) * out.kept_len) / (layers * encoded.layout.seq_len))


def test_graph_tail_fallback_writes_the_cache(tiny, clip, monkeypatch):
    """The CUDA-graph tail's eager path (used before a bucket is captured, or when capture fails)
    must hand the cache to the layers under the name this transformers release takes."""
    from sharp_cli.prune.graphs import TailGraphs

    def written(cache):  # the pool hands the same buffers to the next prefill: copy them out
        return [(layer.length, layer.keys[:, :, :layer.length].clone()) for layer in cache.layers]

    encoded = encode(tiny, clip)
    eager = _prefill(tiny, encoded, method="fastv", ratio=0.25)
    eager_kv = written(eager.cache)
    monkeypatch.setattr(tiny, "graphs", TailGraphs(capture_after=10**9))
    tail = _prefill(tiny, encoded, method="fastv", ratio=0.25)
    tail_kv = written(tail.cache)
    assert [n for n, _ in tail_kv] == [n for n, _ in eager_kv]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tail_kv, eager_kv))
    assert torch.equal(tail.logits, eager.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_run_equals_masked_reference_at_original_positions(tiny_models, clip, family):
    """Pruning must equal the full model whose layers K.. simply cannot see the dropped tokens:
    same hidden states, same (original) rotary positions."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    k = prune_layer(tiny)
    cfg = PruneConfig(method="fastv", ratio=0.3, layer=k).validate()
    pruned = engine.prefill(tiny, encoded, cfg)
    keep_pos = pruned.session.keep_positions
    length = encoded.layout.seq_len
    visible = torch.zeros(length, dtype=torch.bool)
    visible[keep_pos] = True
    mask = torch.ones(length, length, dtype=torch.bool).tril() & visible.view(1, -1)
    mask = mask | torch.eye(length, dtype=torch.bool)  # dropped rows attend to themselves (ignored)
    float_mask = torch.zeros(1, 1, length, length).masked_fill(~mask, float("-inf"))
    layers = tiny.adapter.decoder_layers(tiny.model)
    text = tiny.adapter.text_model(tiny.model)
    text.config._attn_implementation = "sdpa"
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: (a, dict(kw, attention_mask=float_mask)),
                                             with_kwargs=True) for layer in layers[k:]]
    try:
        with torch.inference_mode():
            out = _text_model_forward(tiny, encoded)
            ref_logits = tiny.model.lm_head(out.last_hidden_state[:, -1:])
    finally:
        for hook in hooks:
            hook.remove()
        text.config._attn_implementation = seg.ATTN_NAME
    torch.testing.assert_close(pruned.logits, ref_logits, rtol=1e-4, atol=1e-4)


def _grown_extra(extra: dict, step: int) -> dict:
    """Family kwargs for a sequence `step` tokens longer: per-position masks (DeepStack's
    visual_pos_masks) get False for the new text tokens; everything else is unchanged."""
    return {key: torch.nn.functional.pad(value, (0, step), value=False)
            if torch.is_tensor(value) and value.dtype == torch.bool else value for key, value in extra.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sharp", "fastv"])
def test_cached_decoding_equals_recompute_on_the_pruned_sequence(tiny_models, clip, method, family):
    """Every decode step's logits (static per-layer cache, one step at a time) equal a full prefill,
    without any cache, of the prompt plus the tokens so far, with the same visual tokens kept. The
    positions of the new tokens are built here: the next position after the prompt's largest, on
    every axis (M-RoPE or 1-D), one more per token."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    cfg = PruneConfig(method=method, ratio=0.25, layer=prune_layer(tiny)).validate()
    prompt_ids = engine.prepare(tiny, clip, "what colour is the ball?", 56 * 56 * 4)["input_ids"]
    state = engine.prefill(tiny, encoded, cfg, new_tokens=6)
    decoded = decode(tiny, encoded, state, 6, prompt_ids=prompt_ids, keep_logits=True, ignore_eos=True)
    tokens, kept = decoded.tokens, state.kept.clone()
    assert len(tokens) == 6 and decoded.logits.shape[0] == 6
    embed, first_new = tiny.adapter.embed, int(encoded.position_ids.max()) + 1
    for step in range(1, len(tokens)):
        new = torch.arange(first_new, first_new + step).expand(*encoded.position_ids.shape[:-1], step)
        grown = type(encoded)(
            inputs_embeds=torch.cat([encoded.inputs_embeds, embed(tiny.model, torch.tensor([tokens[:step]]))], dim=1),
            position_ids=torch.cat([encoded.position_ids, new], dim=-1),
            layout=type(encoded.layout)(encoded.layout.indices, encoded.layout.grid,
                                        encoded.layout.frames_per_step, encoded.layout.seq_len + step),
            next_position=encoded.next_position, extra=_grown_extra(encoded.extra, step))
        again = engine.prefill(tiny, grown, cfg, forced_keep=kept)
        torch.testing.assert_close(decoded.logits[step], again.logits.reshape(-1).float(), rtol=1e-4, atol=1e-4)
        assert int(again.logits.argmax()) == tokens[step], f"step {step}"


@pytest.mark.parametrize("family", FAMILIES)
def test_query_row_scores_equal_eager_attention(tiny_models, clip, family):
    """Scores from post-RoPE q/k of the query rows (q/k norms applied where the family has them)
    equal layer K's full attention matrix rows."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    k = prune_layer(tiny)
    text = tiny.adapter.text_model(tiny.model)
    layers = tiny.adapter.decoder_layers(tiny.model)
    for mode in ("last", "text"):
        captured = {}

        def grab(layer, args, kwargs):
            rows = query_rows(encoded.layout, mode)
            captured["scores"] = question_attention(layer, tiny.adapter.rope(layer), args[0],
                                                    kwargs["position_embeddings"], encoded.layout, rows)
            captured["rows"] = rows

        hook = layers[k].register_forward_pre_hook(grab, with_kwargs=True)
        text.config._attn_implementation = "eager"
        try:
            with torch.inference_mode():
                out = _text_model_forward(tiny, encoded, output_attentions=True)
        finally:
            hook.remove()
            text.config._attn_implementation = seg.ATTN_NAME
        probs = out.attentions[k][0]  # (H, L, L), reference only: tiny model
        ref = probs[:, captured["rows"]][..., encoded.layout.indices].mean(dim=(0, 1))
        torch.testing.assert_close(captured["scores"], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("way", ["blocks", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 2])
def test_segment_attention_equals_dense_mask_reference(gqa, dtype, way):
    """Both ways of computing the mask, with grouped-query heads, text between segments and
    segments of two lengths (batched per length by the merged way)."""
    torch.manual_seed(0)
    length, heads, dim = 60, 4, 16
    segments = [(3, 13), (13, 23), (26, 40), (40, 47)]
    q = torch.randn(1, heads, length, dim) * 2  # sharp attention, so the merge is exercised
    k = torch.randn(1, heads // gqa, length, dim)
    v = torch.randn(1, heads // gqa, length, dim)
    low = lambda t: t.to(dtype)  # noqa: E731
    if way == "merged":
        out = seg.merged_segment_attention(low(q), low(k), low(v), segments, scaling=dim**-0.5)
    else:
        out = seg.segment_causal_attention(low(q), low(k), low(v), seg.row_blocks(length, segments), scaling=dim**-0.5)
    rep = lambda t: t.repeat_interleave(gqa, dim=1)  # noqa: E731
    mask = seg.dense_segment_mask(length, segments)
    ref = torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("way, other", [("blocks", "merged_segment_attention"), ("merged", "segment_causal_attention")])
def test_segment_attention_option_picks_the_way(tiny, clip, monkeypatch, way, other):
    """Each way must really run when asked for (either would give right answers)."""
    def not_this(*args, **kwargs):
        raise AssertionError(f"ran {other}")

    monkeypatch.setattr(seg, other, not_this)
    encoded = encode(tiny, clip)
    out = _prefill(tiny, encoded, method="sharp", ratio=0.5, layer=2, segment_attention=way)
    assert out.kept.numel() == keep_count(0.5, encoded.layout.num_visual)


@pytest.mark.parametrize("family, segment_frames", [(f, None) for f in FAMILIES] + [("qwen3-vl", 4)])
def test_segment_mask_in_the_model_equals_dense_reference(tiny_models, clip, family, segment_frames):
    """Also on Qwen3-VL, whose token frames are separate blocks: with 4 frames a segment spans two
    of them and the timestamp between."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    k = prune_layer(tiny)
    cfg = PruneConfig(method="sharp", ratio=1.0, layer=k, segment_mask=True, debias="none", dedup=False,
                      segment_frames=segment_frames)
    ours = engine.prefill(tiny, encoded, cfg)
    runs = encoded.layout.segment_runs(segment_frames or encoded.layout.frames_per_step)
    dense = seg.dense_segment_mask(encoded.layout.seq_len, runs)
    float_mask = torch.zeros(1, 1, *dense.shape).masked_fill(~dense, float("-inf"))
    causal = torch.zeros_like(float_mask).masked_fill(~torch.ones_like(dense).tril(), float("-inf"))
    layers = tiny.adapter.decoder_layers(tiny.model)
    text = tiny.adapter.text_model(tiny.model)
    text.config._attn_implementation = "sdpa"
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: (a, dict(kw, attention_mask=float_mask if i < k else causal)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            out = _text_model_forward(tiny, encoded)
            ref = tiny.model.lm_head(out.last_hidden_state[:, -1:])
    finally:
        for hook in hooks:
            hook.remove()
        text.config._attn_implementation = seg.ATTN_NAME
    torch.testing.assert_close(ours.logits, ref, rtol=1e-4, atol=1e-4)


# -- each component changes the kept set where it should -------------------------------------------
class _Layout:
    def __init__(self, t, h, w):
        self.grid = (t, h, w)
        self.num_visual = t * h * w


def test_dedup_skips_a_duplicated_frame_and_refills():
    torch.manual_seed(0)
    layout = _Layout(4, 2, 2)
    hidden = torch.randn(16, 32)
    hidden[4:8] = hidden[0:4]  # frame 1 repeats frame 0
    scores = torch.linspace(0.1, 1.0, 16).flip(0)  # frames 0 and 1 score highest
    cfg = PruneConfig(ratio=0.5, debias="none", dedup=True, register_z=0)
    plain = select_with_refill(scores, torch.zeros(16, dtype=torch.bool), 8)
    kept, stats = select_sharp(scores, None, hidden, layout, cfg)
    assert plain.tolist() == list(range(8))
    assert stats["duplicates"][4:8].all() and not stats["duplicates"][:4].any()
    assert kept.numel() == 8 and not set(kept.tolist()) & {4, 5, 6, 7}


def test_dedup_refills_from_duplicates_when_budget_demands():
    layout = _Layout(2, 1, 2)
    hidden = torch.ones(4, 8)  # everything identical
    kept, stats = select_sharp(torch.tensor([4.0, 3.0, 2.0, 1.0]), None, hidden, layout,
                               PruneConfig(ratio=1.0, debias="none", register_z=0))
    assert kept.tolist() == [0, 1, 2, 3]


def test_debias_removes_a_prior_that_favours_late_frames():
    n = 32
    prior = torch.linspace(0.0, 1.0, n) ** 4  # late frames attract attention whatever the content
    content = torch.zeros(n)
    content[[3, 7, 11]] = 0.02
    scores = prior + content
    k = 3
    plain = torch.topk(scores, k).indices.sort().values.tolist()
    fixed = torch.topk(debias(scores, prior, "subtract"), k).indices.sort().values.tolist()
    assert plain == [29, 30, 31] and fixed == [3, 7, 11]
    assert torch.topk(debias(scores, prior + 1e-3, "divide"), k).indices.sort().values.tolist() == [3, 7, 11]


def test_dividing_removes_a_bias_added_to_the_attention_logits_and_subtracting_does_not():
    """Positional bias as RoPE gives it: a content-free term added to every logit. The black video
    sees only that term, so dividing it out must rank by content alone. Subtracting weights each
    difference by the prior, and when one token takes most of the attention (as sharp-tiny's layer
    2 does) it ranks the rest by the prior, reversed. Would catch a divide that reverted to
    subtraction, or a normalisation that broke the ratio."""
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 10
    bias = torch.linspace(-3.0, 3.0, n)  # late tokens attract attention whatever they show
    content = torch.randn(n, generator=gen) * 0.5
    content[20] = 9.0  # the needle
    scores, prior = torch.softmax(content + bias, 0) * 0.1, torch.softmax(bias, 0) * 0.4  # any mass
    divided = debias(scores, prior, "divide")
    torch.testing.assert_close(divided / divided.sum(), torch.softmax(content, 0), rtol=0.1, atol=0)
    after_needle = lambda ranked: torch.argsort(ranked, descending=True)[1:k + 1].tolist()  # noqa: E731
    assert after_needle(divided) == after_needle(content)
    subtracted = debias(scores, prior, "subtract")
    assert int(subtracted.argmax()) == 20
    assert all(i < 16 for i in after_needle(subtracted))  # the earliest, least-attended positions
    assert PruneConfig().debias == "divide"


def test_register_outliers_are_skipped():
    torch.manual_seed(0)
    hidden = torch.randn(64, 16)
    hidden[10] *= 100
    flags = find_registers(hidden, 8.0)
    assert flags.nonzero().flatten().tolist() == [10]
    assert not find_registers(hidden, 0).any()


def test_duplicates_respect_the_window():
    layout = _Layout(4, 1, 1)
    hidden = torch.ones(4, 8)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    near = find_duplicates(hidden, scores, layout, 0.9, window=1)
    assert near.tolist() == [False, True, True, True]  # each has a better similar neighbour
    different = torch.eye(4, 8)
    assert not find_duplicates(different, scores, layout, 0.9, window=3).any()


def test_prior_pass_is_cached_on_disk_and_reused(tiny, clip, tmp_path):
    cfg = PruneConfig(method="sharp", ratio=0.25, layer=2).validate()
    store = PriorStore(tmp_path)
    first = ask(tiny, clip, "what colour is the ball?", cfg, max_new_tokens=2, max_pixels=56 * 56 * 4,
                       store=store)
    assert not first.prior.cached and list((tmp_path / "priors").glob("*.safetensors"))
    second = ask(tiny, make_clip(seed=3), "where is the dog?", cfg, max_new_tokens=2,
                        max_pixels=56 * 56 * 4, store=PriorStore(tmp_path))
    assert second.prior.cached
    torch.testing.assert_close(second.prior.prior, first.prior.prior)


def test_debias_changes_the_kept_set_in_the_model(tiny, clip):
    base = dict(method="sharp", ratio=0.25, layer=2, dedup=False)
    with_prior = ask(tiny, clip, "what colour is the ball?", PruneConfig(**base), max_new_tokens=1,
                            max_pixels=56 * 56 * 4, store=PriorStore(use_disk=False))
    without = ask(tiny, clip, "what colour is the ball?", PruneConfig(**base, debias="none"),
                         max_new_tokens=1, max_pixels=56 * 56 * 4, store=PriorStore(use_disk=False))
    assert not torch.equal(with_prior.prefill.kept, without.prefill.kept)


def test_layer_bounds_are_checked(tiny):
    from sharp_cli.errors import UsageError

    with pytest.raises(UsageError, match="--layer must be < 4"):
        PruneConfig(layer=4).validate(tiny.num_layers)
    with pytest.raises(UsageError, match="--layer must be >= 1"):
        PruneConfig(layer=0).validate(tiny.num_layers)
    with pytest.raises(UsageError, match="--ratio"):
        PruneConfig(ratio=0).validate()


def test_merged_segment_attention_lets_out_of_memory_through(tiny, clip, monkeypatch):
    """Only a missing kernel may send the merged way to the blocks; running out of memory inside it
    is the user's to see, not a silent switch to the slower way."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(seg, "merged_segment_attention", oom)
    encoded = encode(tiny, clip)
    with pytest.raises(torch.OutOfMemoryError):
        _prefill(tiny, encoded, method="sharp", ratio=0.25, segment_attention="merged", debias="none")
    assert _prefill(tiny, encoded, method="sharp", ratio=0.25, debias="none").kept is not None  # blocks: unaffected

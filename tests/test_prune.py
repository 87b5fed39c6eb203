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
from sharp_cli.prune.sharp import head_mean, query_rows, question_attention

PLAIN = dict(segment_mask=False, debias="none", dedup=False)


def _prefill(loaded, encoded, **kw):
    cfg = loaded.resolve_prune(PruneConfig(**kw))
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


EVS_FAMILIES = [f for f in FAMILIES if f != "qwen3-vl"]  # Qwen3-VL refuses evs (DeepStack)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sharp", "fastv", "evs", "random"])
@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.5])
def test_kept_set_is_exact_sorted_unique_in_range(tiny_models, clip, method, ratio, family):
    if method == "evs" and family not in EVS_FAMILIES:
        pytest.skip("Qwen3-VL refuses evs")
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


@pytest.mark.parametrize("family, method", [(f, "fastv") for f in FAMILIES] + [(f, "evs") for f in EVS_FAMILIES])
def test_pruned_run_equals_masked_reference_at_original_positions(tiny_models, clip, family, method):
    """Pruning must equal the full model whose layers K.. simply cannot see the dropped tokens:
    same hidden states, same (original) rotary positions. evs prunes before layer 0: every layer
    of the reference is masked, so no decoder layer computes anything from a dropped token."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    cfg = tiny.resolve_prune(PruneConfig(method=method, ratio=0.3, layer=prune_layer(tiny)))
    k = cfg.layer
    assert k == (0 if method == "evs" else prune_layer(tiny))
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


@pytest.mark.parametrize("family", EVS_FAMILIES)
def test_evs_keeps_the_most_changed_tokens_before_layer_0(tiny_models, family):
    """evs keeps the round(r * N) tokens whose vision embedding changed most since the same position
    one token frame earlier (1 - cosine, recomputed here in numpy), the whole first token frame
    ranking first; every layer's KV cache holds only the kept tokens."""
    import numpy as np

    tiny = tiny_models(family)
    encoded = encode(tiny, make_clip(frames=8, seed=4))
    layout = encoded.layout
    t, h, w = layout.grid
    ratio = 0.4
    cfg = tiny.resolve_prune(PruneConfig(method="evs", ratio=ratio))
    out = engine.prefill(tiny, encoded, cfg)
    x = encoded.inputs_embeds[0, layout.indices].double().numpy().reshape(t, h * w, -1)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    change = np.concatenate([np.full((1, h * w), np.inf), 1 - (x[1:] * x[:-1]).sum(-1)]).reshape(-1)
    k = keep_count(ratio, layout.num_visual)
    assert k > h * w  # the first token frame and the most changed of the rest
    assert out.kept.tolist() == sorted(np.argsort(-change, kind="stable")[:k].tolist())
    assert [layer.length for layer in out.cache.layers] == [out.kept_len] * tiny.num_layers
    assert float(out.session.details["tie_share"]) == 0.0  # random embeddings: no ties


def test_evs_is_refused_on_qwen3_vl_with_one_line(tiny_models):
    from sharp_cli.errors import UsageError

    tiny = tiny_models("qwen3-vl")
    with pytest.raises(UsageError, match="evs is not supported on Qwen3-VL: DeepStack"):
        tiny.resolve_prune(PruneConfig(method="evs"))


def _grown_extra(extra: dict, step: int) -> dict:
    """Family kwargs for a sequence `step` tokens longer: per-position masks (DeepStack's
    visual_pos_masks) get False for the new text tokens; everything else is unchanged."""
    return {key: torch.nn.functional.pad(value, (0, step), value=False)
            if torch.is_tensor(value) and value.dtype == torch.bool else value for key, value in extra.items()}


@pytest.mark.parametrize("family, method", [(f, m) for f in FAMILIES for m in ("sharp", "fastv")]
                         + [(f, "evs") for f in EVS_FAMILIES])
def test_cached_decoding_equals_recompute_on_the_pruned_sequence(tiny_models, clip, method, family):
    """Every decode step's logits (static per-layer cache, one step at a time) equal a full prefill,
    without any cache, of the prompt plus the tokens so far, with the same visual tokens kept. The
    positions of the new tokens are built here: the next position after the prompt's largest, on
    every axis (M-RoPE or 1-D), one more per token."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    cfg = tiny.resolve_prune(PruneConfig(method=method, ratio=0.25, layer=prune_layer(tiny)))
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
    equal layer K's full attention matrix rows, per head and row (H, R, N) and averaged."""
    tiny = tiny_models(family)
    encoded = encode(tiny, clip)
    k = prune_layer(tiny)
    text = tiny.adapter.text_model(tiny.model)
    layers = tiny.adapter.decoder_layers(tiny.model)
    for mode in ("last", "text"):
        captured = {}

        def grab(layer, args, kwargs):
            rows = query_rows(encoded.layout, mode)
            captured["log"] = question_attention(layer, tiny.adapter.rope(layer), args[0],
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
        ref = probs[:, captured["rows"]][..., encoded.layout.indices]  # (H, R, N)
        assert captured["log"].shape == ref.shape
        torch.testing.assert_close(captured["log"].exp(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(head_mean(captured["log"]), ref.mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)


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
    cfg = tiny.resolve_prune(PruneConfig(method="sharp", ratio=1.0, layer=k, segment_mask=True, debias="none",
                                         dedup=False, segment_frames=segment_frames))
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


def test_prior_pass_is_cached_on_disk_and_reused(tiny, clip, tmp_path):
    cfg = tiny.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=2))
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
    with_prior = ask(tiny, clip, "what colour is the ball?", tiny.resolve_prune(PruneConfig(**base)), max_new_tokens=1,
                            max_pixels=56 * 56 * 4, store=PriorStore(use_disk=False))
    without = ask(tiny, clip, "what colour is the ball?",
                  tiny.resolve_prune(PruneConfig(**base, debias="none")),
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


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "llava-onevision"])
def test_query_text_scores_with_the_questions_rows(tiny_models, clip, family, monkeypatch):
    """The rows that score the video under --query text are exactly the question's tokens, found
    here independently (the question tokenized alone, searched for in the sequence): not
    <|vision_end|>, not LLaVA's newline, not the template's tail."""
    from sharp_cli.prune import PruneConfig, session

    tiny = tiny_models(family)
    question = "where is the red ball?"
    inputs = engine.prepare(tiny, clip, question, 56 * 56 * 4)
    encoded, _ = engine.encode(tiny, inputs)
    ids = inputs["input_ids"][0].tolist()
    alone = tiny.processor.tokenizer(question, add_special_tokens=False)["input_ids"]
    start = max(i for i in range(len(ids) - len(alone) + 1) if ids[i:i + len(alone)] == alone)
    expected = list(range(start, start + len(alone)))
    rows_seen = []
    real = session.question_attention
    monkeypatch.setattr(session, "question_attention", lambda layer, rope, hidden, pe, layout, rows: (
        rows_seen.append(rows.tolist()), real(layer, rope, hidden, pe, layout, rows))[1])
    cfg = tiny.resolve_prune(PruneConfig(query="text", debias="none"))
    engine.prefill(tiny, encoded, cfg)
    assert rows_seen == [expected]
    assert tiny.processor.tokenizer.decode([ids[i] for i in expected]).replace(" ", "") == question.replace(" ", "")
    tail = ids[expected[-1] + 1:]
    assert tail and encoded.layout.seq_len - 1 not in expected  # the template's tail is not a question row
    cfg_last = tiny.resolve_prune(PruneConfig(query="last", debias="none"))
    engine.prefill(tiny, encoded, cfg_last)
    assert rows_seen[-1] == [encoded.layout.seq_len - 1]

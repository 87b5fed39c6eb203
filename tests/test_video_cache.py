"""The per-video cache: a second question about a video skips decoding, the vision encoder and the
question-independent start of the prompt, and answers exactly as a fresh run does."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import FAMILIES, make_clip, prune_layer
from sharp_cli import video as video_mod
from sharp_cli.answer import ask
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore
from sharp_cli.video_cache import VideoCache
from videos import make_video

PIXELS = 56 * 56 * 4
SAMPLING = dict(frames=8, max_pixels=PIXELS)
QUESTIONS = ("what colour is the ball?", "where is the dog?", "how many objects move in the video?")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("vc") / "a.mp4", n_frames=16, fps=8, size=(112, 84)))


def _methods(loaded):
    k = prune_layer(loaded)
    configs = (PruneConfig(method="none"), PruneConfig(method="sharp", ratio=0.25, layer=k),
               PruneConfig(method="fastv", ratio=0.25, layer=k))
    return [loaded.resolve_prune(cfg) for cfg in configs]


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_hits_answer_like_fresh_runs(tiny_models, clip_path, family):
    loaded = tiny_models(family)
    store = PriorStore(use_disk=False)
    for cfg in _methods(loaded):
        cache = VideoCache(1 << 30)
        for n, question in enumerate(QUESTIONS):
            cached = ask(loaded, cache.load_video(clip_path, **SAMPLING), question, cfg, max_new_tokens=6,
                         max_pixels=PIXELS, cache=cache, store=store)
            fresh = ask(loaded, video_mod.load_video(clip_path, **SAMPLING), question, cfg, max_new_tokens=6,
                        max_pixels=PIXELS, store=store)
            assert cached.extra["cache"] == {"vision": n > 0, "prefix": n > 0}
            assert cached.tokens == fresh.tokens, (cfg.method, question)
            torch.testing.assert_close(cached.prefill.logits, fresh.prefill.logits, rtol=1e-4, atol=1e-4)
            if n and cfg.prunes:
                assert torch.equal(cached.prefill.kept, fresh.prefill.kept)


def test_second_question_skips_decoding_and_the_vision_encoder(tiny, clip_path, monkeypatch):
    calls = {"decode": 0, "vision": 0}
    real_load, real_vision = video_mod.load_video, tiny.adapter.vision

    def counting_load(*a, **k):
        calls["decode"] += 1
        return real_load(*a, **k)

    def counting_vision(*a, **k):
        calls["vision"] += 1
        return real_vision(*a, **k)

    real_frames = tiny.adapter.processor_inputs

    def counting_frames(*a, **k):
        calls["frames processed"] += 1
        return real_frames(*a, **k)

    calls["frames processed"] = 0
    monkeypatch.setattr(video_mod, "load_video", counting_load)
    monkeypatch.setattr(tiny.adapter, "vision", counting_vision)
    monkeypatch.setattr(tiny.adapter, "processor_inputs", counting_frames)
    cache = VideoCache(1 << 30)
    for question in QUESTIONS:
        ask(tiny, cache.load_video(clip_path, **SAMPLING), question, tiny.resolve_prune(PruneConfig(method="fastv")),
            max_new_tokens=2, max_pixels=PIXELS, cache=cache)
    assert calls == {"decode": 1, "vision": 1, "frames processed": 1}
    cache.load_video(clip_path, frames=4, max_pixels=PIXELS)  # other sampling: decoded again
    assert calls["decode"] == 2


def test_a_changed_file_is_decoded_again(tmp_path):
    path = str(make_video(tmp_path / "b.mp4", n_frames=16, fps=8, size=(112, 84)))
    cache = VideoCache(1 << 30)
    first = cache.load_video(path, **SAMPLING)
    assert cache.load_video(path, **SAMPLING) is first
    make_video(path, n_frames=24, fps=8, size=(112, 84))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    again = cache.load_video(path, **SAMPLING)
    assert again is not first and again.total_frames == 24


def test_the_cache_stays_under_its_bound(tmp_path):
    paths = [str(make_video(tmp_path / f"v{i}.mp4", n_frames=8, fps=8, size=(112, 84))) for i in range(5)]
    one = video_mod.load_video(paths[0], **SAMPLING).frames.nbytes
    cache = VideoCache(int(one * 2.5))
    for path in paths:
        cache.load_video(path, **SAMPLING)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 2  # the two most recent
    assert cache.load_video(paths[-1], **SAMPLING).key in cache._entries
    tiny_cache = VideoCache(one // 2)  # an entry larger than the bound is not kept
    tiny_cache.load_video(paths[0], **SAMPLING)
    assert len(tiny_cache) == 0 and tiny_cache.bytes == 0


def test_a_prompt_that_starts_differently_does_not_reuse_the_prefix(tiny, clip_path):
    cache = VideoCache(1 << 30)
    clip = cache.load_video(clip_path, **SAMPLING)
    cfg = tiny.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=2))
    ask(tiny, clip, QUESTIONS[0], cfg, max_new_tokens=2, max_pixels=PIXELS, cache=cache)
    found = cache.prefix(tiny, clip, cfg, PIXELS, torch.zeros(5, dtype=torch.long))
    assert found is None
    other_k = tiny.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=3))
    second = ask(tiny, clip, QUESTIONS[1], other_k, max_new_tokens=2, max_pixels=PIXELS, cache=cache)
    assert second.extra["cache"] == {"vision": True, "prefix": False}  # layers 0..2 differ from 0..1


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl"])
def test_a_prompt_rebuilt_from_the_layout_equals_the_processors(tiny_models, family):
    """What a cached video's next question gets instead of the processor's video work: every
    input the full call returns, identical, except the pixels."""
    from sharp_cli import engine

    loaded = tiny_models(family)
    clip = make_clip(frames=8)
    layout = engine.video_layout(loaded, engine.prepare(loaded, clip, "what is it?", PIXELS))
    rebuilt = engine.prepare(loaded, clip, "and which colour is the square?", PIXELS, layout=layout)
    full = engine.prepare(loaded, clip, "and which colour is the square?", PIXELS)
    assert set(full.keys()) - set(rebuilt.keys()) == {"pixel_values_videos"}
    for key in rebuilt.keys():
        assert torch.equal(rebuilt[key], full[key]) and rebuilt[key].dtype == full[key].dtype, key
    assert rebuilt.sharp_question == full.sharp_question

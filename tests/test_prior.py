"""The positional prior (sharp_cli/prior_pass.py, sharp_cli/prune/prior.py): from a black video,
under a cache key that names what it depends on, compared with the scores as distributions, and
kept in memory when the disk is full."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import encode, make_clip
from sharp_cli import engine
from videos import make_video


@pytest.fixture(scope="module")
def unicode_video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("h") / "clip é ü.mp4", n_frames=16, fps=8, size=(112, 84)))


def _prior(loaded, clip, cfg, store, max_pixels=56 * 56 * 4):
    from sharp_cli.prior_pass import positional_prior

    inputs = engine.prepare(loaded, clip, "what colour is the ball?", max_pixels)
    encoded, _ = engine.encode(loaded, inputs)
    return positional_prior(loaded, clip, encoded, cfg, store, max_pixels)


def _cfg(loaded, **kw):
    from sharp_cli.prune import PruneConfig

    return loaded.resolve_prune(PruneConfig(**kw))


def test_the_prior_comes_from_a_black_video(tiny):
    """Two clips of different content and one layout give the same prior, equal to layer K's
    scores of an all-black clip with the fixed question, and unlike the clip's own scores."""
    from sharp_cli.prior_pass import PRIOR_QUESTION, _scores_only
    from sharp_cli.prune.prior import PriorStore

    cfg = _cfg(tiny)
    a = _prior(tiny, make_clip(seed=1), cfg, PriorStore(use_disk=False))
    b = _prior(tiny, make_clip(seed=2), cfg, PriorStore(use_disk=False))
    torch.testing.assert_close(a.prior, b.prior)
    black = make_clip(content=make_clip(seed=1).frames * 0)
    reference = _scores_only(tiny, encode(tiny, black, PRIOR_QUESTION), cfg)
    torch.testing.assert_close(a.prior, reference)
    own = _scores_only(tiny, encode(tiny, make_clip(seed=1), PRIOR_QUESTION), cfg)
    assert not torch.allclose(own, a.prior, rtol=1e-3, atol=1e-6)


def test_the_prior_cache_key_covers_layer_layout_timing_and_model(tiny, tmp_path):
    from sharp_cli import loading
    from sharp_cli.models import adapter_for
    from sharp_cli.models.random_init import build_random, tiny_config
    from sharp_cli.prune.prior import PriorStore

    store = PriorStore(tmp_path)
    cfg = _cfg(tiny)
    first = _prior(tiny, make_clip(), cfg, store)
    assert not first.cached and _prior(tiny, make_clip(seed=5), cfg, store).cached  # same layout: reused
    changes = {
        "layer": (tiny, make_clip(), _cfg(tiny, layer=3)),
        "layout": (tiny, make_clip(frames=4), cfg),
        "query": (tiny, make_clip(), _cfg(tiny, query="text")),
    }
    slow = make_clip()
    slow.fps = 1.0  # same frames and grid, 4x further apart in time: Qwen's temporal positions differ
    changes["timing"] = (tiny, slow, cfg)
    config = tiny_config("qwen2.5-vl")
    model, processor = build_random(config, dtype="float32", seed=1)  # same architecture and name, other weights
    other = loading.ready(loading.Loaded(model, processor, adapter_for(config), tiny.name, torch.device("cpu"),
                                         torch.float32, "none", True))
    changes["model"] = (other, make_clip(), cfg)
    for what, (loaded, clip, c) in changes.items():
        info = _prior(loaded, clip, c, store)
        assert not info.cached, f"a change of {what} reused the cached prior"
        if info.prior.shape == first.prior.shape:
            assert not torch.allclose(info.prior, first.prior), what


def test_the_prior_cache_key_ignores_the_name_as_typed(model_dirs, tmp_path):
    from sharp_cli import loading
    from sharp_cli.prune.prior import PriorStore

    folder = str(model_dirs["qwen2.5-vl"])
    store = PriorStore(tmp_path)
    one = loading.load(folder, device="cpu")
    two = loading.load(folder + "/", device="cpu")  # the same files under another spelling
    assert one.name != two.name
    cfg = _cfg(one)
    assert not _prior(one, make_clip(), cfg, PriorStore(tmp_path)).cached
    assert _prior(two, make_clip(), cfg, PriorStore(tmp_path)).cached
    assert store.directory.exists()


def test_the_prior_cache_key_sees_the_weight_files(model_dirs, tmp_path):
    from sharp_cli.prune.prior import files_fingerprint

    folder = tmp_path / "m"
    shutil.copytree(model_dirs["qwen2.5-vl"], folder)
    before = files_fingerprint(str(folder))
    assert before == files_fingerprint(str(model_dirs["qwen2.5-vl"]))
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert files_fingerprint(str(folder)) != before


def test_debias_normalises_scores_and_prior_to_distributions():
    """Scores and prior are compared as distributions: their scales do not matter (a black video's
    attention mass on the visual tokens differs from a real one's), and subtracting leaves a
    zero-sum correction."""
    from sharp_cli.prune import PruneConfig
    from sharp_cli.prune.sharp import debias, head_mean

    gen = torch.Generator().manual_seed(0)
    log_attention = (torch.rand(2, 1, 48, generator=gen) * 0.02).log()  # a little of the attention reaches the video
    prior = torch.rand(2, 48, generator=gen) * 0.3  # the black video's reaches it more
    for mode in ("subtract", "divide", "divide-mean"):
        cfg = PruneConfig(debias=mode)
        reference = debias(log_attention, prior / prior.sum(-1, keepdim=True), cfg)
        torch.testing.assert_close(debias(log_attention, prior * 1e-3, cfg), reference)
        scaled = debias(log_attention + math.log(7), prior, cfg)  # 7x the attention mass
        torch.testing.assert_close(scaled, reference)
    out = debias(log_attention, prior, PruneConfig(debias="subtract"))
    scores = head_mean(log_attention)
    p = prior / prior.sum(-1, keepdim=True)
    torch.testing.assert_close(out, scores / scores.sum() - p.mean(0))
    assert abs(float(out.sum())) < 1e-6
    # unnormalised, the larger prior would swamp the scores and reorder them
    assert not torch.equal(torch.argsort(out), torch.argsort(scores - prior.mean(0)))


def test_a_full_disk_under_the_prior_cache_keeps_the_prior_in_memory(unicode_video, tmp_path):
    """A file-size limit makes every write fail as a full disk does (EFBIG, raised by safetensors as
    its own SafetensorError, not OSError): `sharp ask` still answers, with one warning line."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # Python ignores SIGXFSZ: writes fail instead

    env = dict(os.environ, SHARP_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parent.parent))
    done = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", unicode_video, "what colour is it?",
                           "-m", "sharp-tiny", "--max-new-tokens", "2", "-q"], capture_output=True, text=True,
                          timeout=300, preexec_fn=small_files, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot write the positional-prior cache" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr
    priors = tmp_path / "cache" / "priors"
    assert not priors.exists() or not any(p.stat().st_size for p in priors.iterdir())  # nothing half-written kept


def test_a_weights_file_changed_in_place_gets_a_new_prior_key(model_dirs, tmp_path):
    """The key names the model by its files' headers and a sample of its loaded weights, not by a
    hash of the whole file: a weights file rewritten with other values (same tensors, shapes, size
    and header) must still get a new key, and an identical copy the same one."""
    from safetensors.torch import load_file, save_file

    from sharp_cli import loading
    from sharp_cli.prior_pass import prior_key
    from sharp_cli.prune.prior import PriorStore, files_fingerprint

    same, changed = tmp_path / "same", tmp_path / "changed"
    for folder in (same, changed):
        shutil.copytree(model_dirs["qwen2.5-vl"], folder)
    weights = changed / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({name: t * 0.5 + 0.25 for name, t in tensors.items()}, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == (same / "model.safetensors").stat().st_size
    assert files_fingerprint(str(changed)) == files_fingerprint(str(same))  # the headers alone cannot tell

    def key(folder):
        loaded = loading.load(str(folder), device="cpu")
        inputs = engine.prepare(loaded, make_clip(), "what colour is the ball?", 56 * 56 * 4)
        encoded, _ = engine.encode(loaded, inputs)
        return PriorStore.key(prior_key(loaded, encoded, _cfg(loaded)))

    original = key(model_dirs["qwen2.5-vl"])
    assert key(same) == original
    assert key(changed) != original

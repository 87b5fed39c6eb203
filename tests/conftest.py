"""Shared fixtures: tiny random models of the real classes (built offline), and small clips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sharp_cli.video import available_backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ["qwen2.5-vl", "qwen2-vl", "qwen3-vl", "llava-onevision"]
HAS_DECORD = available_backends()["decord"] is not None
# `sharp eval`'s small runs (tests/test_eval*.py): one seed per cell, 8 small frames, half the tokens
SMALL = ["--tie-seeds", "1", "--random-seeds", "1", "--frames", "8", "--max-pixels", "12544", "--ratio", "0.5"]
BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="decord not installed"))]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Positional priors and random-model folders go to a temp dir, never the user's cache."""
    os.environ["SHARP_CACHE_DIR"] = str(tmp_path_factory.mktemp("sharp-cache"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """family -> folder with config, random safetensors, tokenizer and processor (from_pretrained-able)."""
    from sharp_cli.models.random_init import tiny_config, write_random_model

    root = tmp_path_factory.mktemp("models")
    return {f: write_random_model(tiny_config(f), root / f, dtype="float32") for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_dir(model_dirs):
    return model_dirs["qwen2.5-vl"]


def load_tiny(family="qwen2.5-vl", layers=4):
    import torch

    from sharp_cli import loading
    from sharp_cli.models import adapter_for
    from sharp_cli.models.random_init import build_random, tiny_config

    config = tiny_config(family, layers=layers)
    model, processor = build_random(config, dtype="float32")
    return loading.ready(loading.Loaded(model, processor, adapter_for(config), f"tiny-{family}",
                                       torch.device("cpu"), torch.float32, "none", True))


@pytest.fixture(scope="module")
def penalised():
    """family -> a tiny model whose generation_config sets a repetition penalty, as Qwen2.5-VL's
    does (one per family and test module)."""
    models = {}

    def get(family):
        if family not in models:
            models[family] = load_tiny(family)
            models[family].model.generation_config.repetition_penalty = 1.3
        return models[family]

    return get


@pytest.fixture(scope="session")
def tiny_models():
    """family -> tiny loaded model, built once per session (per worker)."""
    cache = {}

    def get(family="qwen2.5-vl"):
        if family not in cache:
            cache[family] = load_tiny(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_models):
    return tiny_models("qwen2.5-vl")


def prune_layer(loaded) -> int:
    """The K the tests prune at: 2, or the family's smallest (3 on Qwen3-VL, DeepStack)."""
    return max(2, loaded.adapter.min_layer)


def tower_inputs(visual, grid=(2, 10, 14), seed=0):
    """Random pixels (patches, C*T*P*P) for grid (t, h, w): 10x14 patches make Qwen2.5-VL windows of
    two lengths (full and edge), so packed attention gathers."""
    import torch

    vc = visual.config
    x = torch.randn(grid[0] * grid[1] * grid[2], vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                    generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([grid])


def make_clip(frames=8, height=56, width=56, seed=0, content=None):
    """An in-memory clip (what video.load_video returns) of random or given frames."""
    from sharp_cli.video import VideoClip

    if content is None:
        content = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    n = content.shape[0]
    return VideoClip(frames=content, fps=4.0, total_frames=n, indices=list(range(n)), backend="memory",
                     path="<memory>", notes=[])


@pytest.fixture
def clip():
    return make_clip()


def encode(loaded, clip, question="what colour is the ball?", max_pixels=56 * 56 * 4):
    from sharp_cli import engine

    inputs = engine.prepare(loaded, clip, question, max_pixels)
    encoded, _ = engine.encode(loaded, inputs)
    return encoded


helpers = SimpleNamespace(load_tiny=load_tiny, make_clip=make_clip, encode=encode, prune_layer=prune_layer)


@pytest.fixture(scope="module")
def loaded(model_dirs):
    """The tiny Qwen2.5-VL loaded the way `sharp serve` loads a model (from_pretrained on a folder)."""
    from sharp_cli import loading

    return loading.load(str(model_dirs["qwen2.5-vl"]), device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A media folder for `sharp serve`: three small videos of different shapes and a non-video."""
    from videos import make_video

    root = tmp_path_factory.mktemp("media")
    make_video(root / "clip one.mp4", n_frames=24, fps=8, size=(112, 84))
    make_video(root / "wide.mp4", n_frames=16, fps=8, size=(112, 56))
    make_video(root / "tall.mp4", n_frames=32, fps=8, size=(56, 112))
    (root / "not a video.mp4").write_text("just text\n")
    return root


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """The test videos, encoded once for the module (about a second in all)."""
    from videos import make_video

    d = tmp_path_factory.mktemp("videos")
    return {
        "h264": make_video(d / "h264.mp4"),
        "vp9": make_video(d / "vp9.webm", codec="libvpx-vp9"),
        "mpeg4": make_video(d / "mpeg4.mp4", codec="mpeg4"),
        # B-frames (pts order != decode order) and keyframes every 7 frames: seeks land mid-file.
        "bframes": make_video(d / "bframes.mp4", n_frames=60, gop=7, codec_options={"preset": "medium"}),
        "mkv_gop5": make_video(d / "gop5.mkv", n_frames=60, gop=5),
        # No index: seeks land on any packet, often past the keyframe the target needs.
        "mpegts": make_video(d / "ts.ts", n_frames=60, gop=10),
    }


def sharp(*args):
    """`sharp ARGS...` in this process (typer's CliRunner), every argument as a string."""
    from typer.testing import CliRunner

    from sharp_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_jsonl(path) -> list[dict]:
    """Every line of a JSON-lines file (eval's results, its questions)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def synth_items(tmp_path_factory):
    """Three synthetic eval questions (`sharp synth`), written once per test module."""
    from sharp_cli.evaluate import synth

    return synth.write(tmp_path_factory.mktemp("synth"), 3, seed=0, frames=16, size=64)


def grid_layout(t, h, w):
    """The visual layout the selection functions read: a (t, h, w) token grid and its size."""
    return SimpleNamespace(grid=(t, h, w), num_visual=t * h * w)


def run_sharp(log_attention, hidden, grid, prior=None, **kw):
    """select_sharp on a (t, h, w) grid with PruneConfig(**kw): (kept, details)."""
    from sharp_cli.prune import PruneConfig
    from sharp_cli.prune.sharp import select_sharp

    return select_sharp(log_attention, prior, hidden, grid_layout(*grid), PruneConfig(**kw))


def triton_interpreted(code: str, *, timeout: int = 600, **env_extra: str) -> str:
    """stdout of `code` (dedented) run in a fresh Python with Triton's CPU interpreter on (chosen when
    Triton compiles, so a kernel test needs its own process), offline, the repo and tests importable;
    env_extra: more environment (the switch of the kernel under test). Fails on a non-zero exit."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout

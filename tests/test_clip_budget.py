"""The visual-token budget and the model's context, checked before decoding (sharp_cli/clip_budget.py,
sharp_cli/models/budget.py): --max-visual-tokens, the context, frames decoded no larger than the
processor keeps, and sharp-tiny's own processor bound."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_clip
from sharp_cli import engine
from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("fc") / "clip.mp4", n_frames=16, fps=8, size=(112, 84)))


def sharp(*args):
    return runner.invoke(app, [str(a) for a in args])


def _forbid(monkeypatch, module, name):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran although the clip was refused")

    monkeypatch.setattr(module, name, called)


def test_max_visual_tokens_refuses_before_decoding(model_dirs, video, monkeypatch):
    from sharp_cli import video as video_mod

    _forbid(monkeypatch, video_mod, "load_video")
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--max-visual-tokens", "10")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert "80 visual tokens" in line and "--max-visual-tokens 10" in line  # 84x112 frames upscaled to 112x140
    assert "--frames" in line and "--max-pixels" in line and "4x4x5" in line


def test_max_visual_tokens_is_checked_again_before_the_vision_encoder(model_dirs, video, monkeypatch):
    """No header to estimate from (a decord-only install): the decoded frames are checked."""
    from sharp_cli import video as video_mod

    monkeypatch.setattr(video_mod, "probe", lambda path: None)
    assert sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--max-visual-tokens", "80",
                 "-q").exit_code == 0
    _forbid(monkeypatch, engine, "encode")
    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--max-visual-tokens", "79")
    assert result.exit_code == 2 and "80 visual tokens" in result.stderr


def test_llava_names_frames_not_max_pixels(model_dirs, video, monkeypatch):
    result = sharp("ask", video, "what?", "-m", model_dirs["llava-onevision"], *SMALL, "--max-visual-tokens", "5")
    assert result.exit_code == 2 and "128 visual tokens" in result.stderr and "8x4x4" in result.stderr
    assert "--max-pixels does not change it" in result.stderr


def test_the_context_is_checked_before_decoding(model_dirs, video, tmp_path, monkeypatch):
    from sharp_cli import video as video_mod

    folder = tmp_path / "short-context"
    shutil.copytree(model_dirs["qwen2.5-vl"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    _forbid(monkeypatch, video_mod, "load_video")
    result = sharp("ask", video, "what?", "-m", folder, *SMALL)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "over the model's 100-token context (max_position_embeddings)" in result.stderr
    assert "80 visual" in result.stderr and "lower --frames" in result.stderr


@pytest.mark.parametrize("size, decoded", [((1920, 1080), (560, 1008)), ((1280, 720), (720, 1280))])
def test_frames_are_decoded_no_larger_than_the_budget(model_dirs, tmp_path, monkeypatch, size, decoded):
    """Without --max-pixels, a video far larger than the family's per-frame budget (768 tokens' worth
    on Qwen2.5-VL) is decoded at the size the processor makes of it, not at full size, and becomes
    the reference pipeline's grid; one within twice the budget is decoded as stored and resized by
    the processor (clip_budget.DECODE_MARGIN)."""
    from sharp_cli import video as video_mod

    path = make_video(tmp_path / "big.mp4", n_frames=8, fps=8, size=size)
    shapes = []
    real = video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: shapes.append(real(*a, **k)) or shapes[-1])
    result = sharp("ask", path, "what?", "-m", model_dirs["qwen2.5-vl"], "--frames", "2", "--max-new-tokens", "1",
                   "--json", "--method", "none")
    assert result.exit_code == 0, result.stderr
    assert shapes[0].frames.shape[1:3] == decoded and decoded[0] * decoded[1] <= 2 * 768 * 28 * 28
    assert json.loads(result.stdout)["token_grid"] == [1, 20, 36]  # 560 x 1008 pixels, as qwen-vl-utils resizes


@pytest.fixture(scope="module")
def clip_640(tmp_path_factory):
    """An ordinary 640x360 clip of 32 frames (8 fps, 4 s)."""
    return str(make_video(tmp_path_factory.mktemp("ord") / "ordinary.mp4", n_frames=32, fps=8, size=(640, 360)))


def test_sharp_tiny_answers_an_ordinary_clip_and_counts_its_real_tokens(clip_640):
    """sharp-tiny's processor keeps 12,544 pixels a frame: 32 frames of 640x360 are 16 x 3 x 5 = 240
    visual tokens, not the ~4,784 of the family's budget (which its 4,096-token context refused)."""
    result = sharp("ask", clip_640, "What colour is the square?", "-m", "sharp-tiny", "--max-new-tokens", "2",
                   "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["token_grid"] == [16, 3, 5] and record["visual_tokens_total"] == 240
    assert sharp("ask", clip_640, "what?", "-m", "sharp-tiny", "--max-visual-tokens", "240", "--max-new-tokens", "1",
                 "-q").exit_code == 0
    refused = sharp("ask", clip_640, "what?", "-m", "sharp-tiny", "--max-visual-tokens", "239")
    assert refused.exit_code == 2 and "240 visual tokens" in refused.stderr and "16x3x5" in refused.stderr


def test_sharp_bench_runs_sharp_tiny_with_its_default_layout():
    """The default synthetic layout (32 frames of 392x784) is 160 tokens for sharp-tiny's processor."""
    result = sharp("bench", "-m", "sharp-tiny", "--methods", "none", "--iters", "1", "--warmup", "0",
                   "--decode-tokens", "1", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rows"][0]["visual_tokens_total"] == 16 * 2 * 5


def test_the_saved_bound_read_before_loading_is_the_processors():
    from transformers import AutoProcessor

    from sharp_cli.loading import SHARP_TINY, saved_video_bound
    from sharp_cli.models import budget
    from sharp_cli.models.random_init import CONFIG_DIR

    processor = AutoProcessor.from_pretrained(str(SHARP_TINY))
    assert saved_video_bound("sharp-tiny") == budget.saved_bound(processor.video_processor) == 112 * 112
    assert budget.saved_bound_in(CONFIG_DIR / "Qwen--Qwen2.5-VL-7B-Instruct") == 12_845_056  # looser: no effect
    assert saved_video_bound("sharp-tiny", random_weights=True) is None


@pytest.mark.parametrize("size", [(640, 360), (1920, 1080), (360, 640), (500, 499), (3840, 1600)])
def test_sharp_tiny_grid_is_the_same_decoded_full_size_or_at_the_processors_size(size):
    """The estimate from the header, the processor on full-size frames, and the processor on frames
    decoded at the size it makes of them (clip_budget.py) give one grid, also where resizing the
    resized frame again would not (sharp-tiny's lower and upper bounds are equal)."""
    from transformers import AutoProcessor

    from sharp_cli.clip_budget import ClipBudget
    from sharp_cli.loading import SHARP_TINY
    from sharp_cli.models import adapter_for, budget
    from sharp_cli.video import VideoInfo

    processor = AutoProcessor.from_pretrained(str(SHARP_TINY))
    config = __import__("transformers").AutoConfig.from_pretrained(str(SHARP_TINY))
    adapter = adapter_for(config)
    fit = ClipBudget(adapter, config, budget.saved_bound(processor.video_processor))
    width, height = size
    info = VideoInfo("x.mp4", width, height, 8.0, 64)
    video = fit.plan(info, dict(frames=4, fps=None, max_frames=768, max_pixels=None, backend="auto"))

    def grid(frames, sized=False):
        clip = make_clip(content=frames)
        clip.sized = sized
        inputs = adapter.processor_inputs(processor, adapter.prompt(processor, "what?"), clip, None)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        return t, h // 2, w // 2

    full = grid(np.zeros((4, height, width, 3), np.uint8))
    assert full == fit.check(4, height, width).grid
    assert "size" in video  # far larger than the 12,544 pixels kept: decoded at the processor's size
    w, h = video["size"]
    assert grid(np.zeros((4, h, w, 3), np.uint8), sized=True) == full

"""What a new user, a real checkpoint's files and a real GPU hit first (issue 13): each case built.

The bare command, --version and `sharp env`; the video checked before any model lookup; an
unreachable hub in one quick line; the visual-token budget and the context checked before
decoding; bf16 only where the GPU has it; the question's own rows for --query text; the prior
from a black video under a key that names what it depends on; tables that fit 80 columns; the
bench table script on every result file.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import encode, make_clip
from sharp_cli import engine
from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("fc") / "clip.mp4", n_frames=16, fps=8, size=(112, 84)))


def sharp(*args):
    return runner.invoke(app, [str(a) for a in args])


def _no_network_env(tmp_path, **extra):
    """A subprocess environment with the hub unreachable at once (a closed local port) and an empty
    Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(REPO), **extra)
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    return env


# -- the command itself ---------------------------------------------------------------------------
def test_bare_sharp_prints_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage:") and "ask" in result.stdout and len(result.stdout.splitlines()) > 8
    out = subprocess.run([sys.executable, "-m", "sharp_cli"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and out.stdout.startswith("Usage:") and out.stderr == ""


def test_version():
    from sharp_cli import __version__

    result = sharp("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"sharp {__version__}"


def test_env_names_the_module_that_imports():
    import importlib.metadata as md

    result = sharp("env")
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("decord (module)"))
    import decord

    assert decord.__version__ in line and "not installed" not in result.stdout.split("decord (module)")[1]
    if "decord2" in md.packages_distributions().get("decord", []):
        assert "from decord2" in line


# -- the video first, and an unreachable hub -------------------------------------------------------
def test_the_video_is_checked_before_any_model_lookup(tmp_path, monkeypatch):
    from sharp_cli import hub, loading

    def looked_up(*args, **kwargs):
        raise AssertionError("the model was looked up before the video was checked")

    monkeypatch.setattr(hub, "check_reachable", looked_up)
    monkeypatch.setattr(loading, "read_config", looked_up)
    result = sharp("ask", tmp_path / "video.mp4", "what?", "-m", "nobody/nothing")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "cannot read video" in result.stderr and "not found" in result.stderr


def test_unreachable_hub_is_one_quick_line(video, tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what?", "-m", "nobody/no-model"],
                         capture_output=True, text=True, timeout=120, env=_no_network_env(tmp_path))
    elapsed = time.perf_counter() - start
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("sharp: error: cannot reach the Hugging Face Hub")
    assert "HF_HUB_OFFLINE=1" in out.stderr and "-m" in out.stderr and "not in the local cache" in out.stderr
    assert elapsed < 20, f"{elapsed:.1f} s (transformers' own retries take ~40 s)"


def test_unreachable_hub_uses_a_cached_model(video, tmp_path, model_dirs):
    """The model in the hub cache and no network: the run goes on from the cache, offline."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(model_dirs["qwen2.5-vl"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    out = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", video, "what?", "-m", "someone/tiny", *SMALL,
                          "--json"], capture_output=True, text=True, timeout=300, env=_no_network_env(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["model"] == "someone/tiny"


def test_hub_probe_is_bounded(monkeypatch):
    """A hub that accepts the connection and never answers costs the probe's timeout, no more."""
    import socket

    from huggingface_hub import constants

    from sharp_cli import hub

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connections are queued, never answered
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        start = time.perf_counter()
        reason = hub.unreachable(timeout=0.5)
        assert reason and time.perf_counter() - start < 2.5
    finally:
        silent.close()


# -- the visual-token budget and the context, before decoding --------------------------------------
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


# -- the model's own processor bound (sharp-tiny) ------------------------------------------------
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


# -- dtype ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_and_nf4_compute_dtype_follow_the_gpu(monkeypatch, model_dirs, native, expected):
    """bf16 only where the GPU has it in hardware (is_bf16_supported(including_emulation=False));
    the nf4 compute dtype follows the model's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText

    from sharp_cli import loading

    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        calls.append(including_emulation) or (native or including_emulation))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert loading.resolve_dtype("auto", torch.device("cuda")) == expected and calls == [False]
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    seen = {}

    class Stop(Exception):
        pass

    def capture(name, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", capture)
    with pytest.raises(Stop):
        loading.load(str(model_dirs["qwen2.5-vl"]), device="cuda", quant="nf4")
    assert seen["dtype"] == expected and seen["quantization_config"].bnb_4bit_compute_dtype == expected


# -- --query text: the question's own rows ----------------------------------------------------------
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
    cfg = tiny.adapter.validate_prune(PruneConfig(query="text", debias="none"), tiny.num_layers)
    engine.prefill(tiny, encoded, cfg)
    assert rows_seen == [expected]
    assert tiny.processor.tokenizer.decode([ids[i] for i in expected]).replace(" ", "") == question.replace(" ", "")
    tail = ids[expected[-1] + 1:]
    assert tail and encoded.layout.seq_len - 1 not in expected  # the template's tail is not a question row
    cfg_last = tiny.adapter.validate_prune(PruneConfig(query="last", debias="none"), tiny.num_layers)
    engine.prefill(tiny, encoded, cfg_last)
    assert rows_seen[-1] == [encoded.layout.seq_len - 1]


# -- the positional prior --------------------------------------------------------------------------
def _prior(loaded, clip, cfg, store, max_pixels=56 * 56 * 4):
    from sharp_cli.prior_pass import positional_prior

    inputs = engine.prepare(loaded, clip, "what colour is the ball?", max_pixels)
    encoded, _ = engine.encode(loaded, inputs)
    return positional_prior(loaded, clip, encoded, cfg, store, max_pixels)


def _cfg(loaded, **kw):
    from sharp_cli.prune import PruneConfig

    return loaded.adapter.validate_prune(PruneConfig(**kw), loaded.num_layers)


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
    from sharp_cli.models.random_init import build_random, tiny_config
    from sharp_cli import loading
    from sharp_cli.models import adapter_for
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


# -- tables in 80 columns --------------------------------------------------------------------------
def _render(renderable, width):
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_ask_table_fits_a_narrow_stderr_without_cutting_values(model_dirs, video):
    from sharp_cli import report

    result = sharp("ask", video, "what?", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--json")
    record = json.loads(result.stdout)
    record.update(device="cuda:0", gpu="NVIDIA H100 80GB HBM3 with a long board name", quant="nf4",
                  peak_memory_bytes=17_012_345_678)
    values = [v for _, v in report.ask_rows(record)]
    for width in (60, 80):
        out = _render(report.ask_table(record, width=width), width)
        assert max(len(line) for line in out.splitlines()) <= width
        flat = " ".join(out.split())
        for value in values:
            assert " ".join(value.split()) in flat, value  # every value whole, only wrapped at spaces
    wide = _render(report.ask_table(record, width=200), 200)
    assert "┃" in wide or "│" in wide  # the boxed table where it fits


def test_fit_table_drops_columns_by_priority_and_says_so():
    from sharp_cli.report import fit_table

    headers = ["method", "ratio", "prefill", "speed-up", "TTFT", "KV cache", "peak mem", "decode tok/s"]
    rows = [["none", "1.00", "171.2 ms", "1.00x", "406.3 ms", "343.75 MiB", "17.12 GiB", "41.3"],
            ["sharp", "0.15", "41.1 ms", "4.17x", "276.0 ms", "73.00 MiB", "16.80 GiB", "44.0"]]
    out = _render(fit_table("bench", headers, rows, 60, priority=[0, 1, 2, 3, 5, 4, 6, 7]), 60)
    assert max(len(line) for line in out.splitlines()) <= 60
    for cell in ("171.2 ms", "4.17x", "41.1 ms", "0.15"):
        assert cell in out
    assert "decode tok/s" in out.split("not shown")[1] and "17.12 GiB" not in out
    full = _render(fit_table("bench", headers, rows, None), 200)
    assert all(cell in full for row in rows for cell in row) and "not shown" not in full


# -- scripts/bench_table.py ------------------------------------------------------------------------
def test_bench_table_reads_every_result_or_says_why(model_dirs, tmp_path):
    cpu = tmp_path / "cpu-bench.json"
    result = sharp("bench", "-m", model_dirs["qwen2.5-vl"], "--frames", "4", "--height", "56", "--width", "56",
                   "--iters", "1", "--warmup", "0", "--decode-tokens", "0", "--methods", "none,fastv",
                   "--output-json", cpu, "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(cpu.read_text())["rows"][0]["peak_memory_bytes"] is None  # a CPU run has none
    (tmp_path / "broken.json").write_text("{not json")
    paths = sorted(str(p) for p in (REPO / "docs" / "results").glob("h100-*.json"))
    paths += [str(cpu), str(tmp_path / "broken.json")]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_table.py"), *paths], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    asks = [p for p in paths if "ask" in os.path.basename(p)]
    for path in asks:
        assert f"skipped {path}: a `sharp ask` result" in out.stderr
    assert f"skipped {tmp_path / 'broken.json'}: not JSON" in out.stderr
    assert out.stdout.count("| method | ratio |") == len(paths) - len(asks) - 1
    fastv = next(line for line in out.stdout.split(str(cpu))[1].splitlines() if line.startswith("| fastv |"))
    assert fastv.endswith("| - |")  # a CPU run has no peak GPU memory


def test_sharp_tiny_is_not_quantized_by_default_on_a_gpu():
    import torch

    from sharp_cli.loading import resolve_quant

    cuda = torch.device("cuda")
    assert resolve_quant("auto", cuda, "sharp-tiny") == "none"
    assert resolve_quant("auto", cuda, "Qwen/Qwen2.5-VL-7B-Instruct") == "nf4"
    assert resolve_quant("nf4", cuda, "sharp-tiny") == "nf4"  # asked for: done

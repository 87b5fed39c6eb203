"""Model families: token layouts, shipped configs, and the CLI on LLaVA-OneVision and Qwen3-VL.

The pruning correctness checks (identities, masked reference, cached decoding, eager scores) run
on every family in tests/test_prune.py; this file covers what is family-specific.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import encode, make_clip, prune_layer
from sharp_cli import engine
from sharp_cli.answer import ask
from sharp_cli.cli import app
from sharp_cli.errors import UsageError
from sharp_cli.models import VisualLayout, adapter_for, supported_families
from sharp_cli.models.random_init import ALIASES, load_config, packaged_configs, synthetic_tokenizer
from sharp_cli.prune import PruneConfig, keep_count
from videos import make_video

NEW = ["llava-onevision", "qwen3-vl"]
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]
runner = CliRunner()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("m") / "clip.mp4", n_frames=16, fps=8, size=(112, 84)))


def sharp(*args):
    return runner.invoke(app, [str(a) for a in args])


def _layer_args(family):
    return ["--layer", "3"] if family == "qwen3-vl" else []


# -- VisualLayout --------------------------------------------------------------------------------
def test_segment_runs_of_one_contiguous_block():
    layout = VisualLayout(indices=torch.arange(5, 5 + 4 * 2 * 3), grid=(4, 2, 3), frames_per_step=2, seq_len=40)
    assert layout.segment_runs(2) == [(5, 11), (11, 17), (17, 23), (23, 29)]
    assert layout.segment_runs(3) == [(5, 17), (17, 29)]  # 3 frames round up to 2 token frames
    assert layout.segment_runs(100) == [(5, 29)]


def test_segment_runs_across_blocks_separated_by_text():
    """Qwen3-VL: one block of pads per token frame, timestamp text in between."""
    blocks = [torch.arange(start, start + 4) for start in (3, 10, 17)]  # 3 token frames of 2x2
    layout = VisualLayout(indices=torch.cat(blocks), grid=(3, 2, 2), frames_per_step=2, seq_len=30)
    assert layout.segment_runs(2) == [(3, 7), (10, 14), (17, 21)]
    assert layout.segment_runs(4) == [(3, 14), (17, 21)]  # the text 7..9 lies inside the first segment
    assert layout.visual_end == 21
    assert layout.text_positions.tolist() == [p for p in range(30) if not 3 <= p < 7 and not 10 <= p < 14
                                              and not 17 <= p < 21]


def test_segment_runs_reject_a_split_token_frame():
    indices = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])  # frame 0 has a gap
    layout = VisualLayout(indices=indices, grid=(2, 2, 2), frames_per_step=1, seq_len=10)
    with pytest.raises(ValueError, match="token frame 0 are not contiguous"):
        layout.segment_runs(1)


# -- shipped configs -----------------------------------------------------------------------------
def test_every_family_is_registered():
    families = supported_families()
    for name in ("qwen2.5-vl", "qwen2-vl", "qwen3-vl", "llava-onevision"):
        assert name in families


def test_llava_video_is_an_alias_of_llava_onevision_7b():
    alias, target = next(iter(ALIASES.items()))
    assert alias == "llava-hf/LLaVA-Video-7B-Qwen2-hf" and packaged_configs()[alias] == packaged_configs()[target]
    assert load_config(alias).to_dict() == load_config(target).to_dict()


# Parameters (billions) that from_config builds; docs/model-configs.md lists the same.
PARAMS = {"Qwen/Qwen2.5-VL-7B-Instruct": 8.292, "Qwen/Qwen2.5-VL-3B-Instruct": 3.755,
          "Qwen/Qwen2-VL-7B-Instruct": 8.291, "Qwen/Qwen3-VL-8B-Instruct": 8.767, "Qwen/Qwen3-VL-4B-Instruct": 4.438,
          "llava-hf/llava-onevision-qwen2-7b-ov-hf": 8.031, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": 0.894,
          "llava-hf/LLaVA-Video-7B-Qwen2-hf": 8.031}


@pytest.mark.parametrize("name", sorted(packaged_configs()))
def test_shipped_config_builds_and_its_synthetic_processor_tokenizes_the_prompt(name):
    from transformers import AutoModelForImageTextToText

    config = load_config(name)
    adapter = adapter_for(config)
    with torch.device("meta"):  # the real architecture, no memory
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == PARAMS[name]
    assert len(adapter.decoder_layers(model)) == config.text_config.num_hidden_layers
    assert adapter.skip_modules()[-1] == "lm_head"
    for prefix in adapter.skip_modules():
        assert any(n.startswith(prefix) for n, _ in model.named_modules()), prefix
    special = adapter.special_tokens(config)
    vocab = config.text_config.vocab_size
    assert len(set(special.values())) == len(special) and all(0 < i < vocab for i in special.values())
    processor = adapter.build_processor(synthetic_tokenizer(special, vocab), config)
    clip = make_clip(frames=4, height=64, width=96)
    inputs = adapter.processor_inputs(processor, adapter.prompt(processor, "what colour is the ball?"), clip,
                                      64 * 96)
    ids = inputs["input_ids"][0]
    assert 0 not in ids.tolist()  # every word and template token is known
    n_video = int((ids == config.video_token_id).sum())
    if adapter.family == "llava-onevision":
        side = -(-(config.vision_config.image_size // config.vision_config.patch_size) // 2)
        assert side == 14 and n_video == 4 * side * side + 1  # 196 per frame + the newline
    else:
        merge = config.vision_config.spatial_merge_size
        assert n_video == int(inputs["video_grid_thw"].prod()) // merge**2


# -- LLaVA-OneVision -----------------------------------------------------------------------------
def test_llava_layout_positions_and_newline(tiny_models, clip):
    loaded = tiny_models("llava-onevision")
    encoded = encode(loaded, clip)
    layout = encoded.layout
    ids = engine.prepare(loaded, clip, "what colour is the ball?", 56 * 56 * 4)["input_ids"][0]
    block = (ids == loaded.model.config.video_token_id).nonzero().flatten()
    newline = int(block[-1])
    assert layout.grid == (8, 4, 4) and layout.frames_per_step == 1
    assert torch.equal(layout.indices, block[:-1]) and newline == layout.visual_end
    assert newline in layout.text_positions.tolist()
    assert torch.equal(encoded.position_ids, torch.arange(layout.seq_len).view(1, -1))
    assert loaded.adapter.decode_position(encoded, 2).tolist() == [[layout.seq_len + 2]]
    assert layout.segment_runs(1)[0] == (int(block[0]), int(block[0]) + 16)


@pytest.mark.parametrize("method", ["sharp", "fastv", "random"])
def test_llava_newline_is_always_kept(tiny_models, clip, method):
    loaded = tiny_models("llava-onevision")
    encoded = encode(loaded, clip)
    newline = encoded.layout.visual_end
    cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=0.05, layer=2))
    state = engine.prefill(loaded, encoded, cfg)
    assert state.kept.numel() == keep_count(0.05, encoded.layout.num_visual)
    assert newline in state.session.keep_positions.tolist()


# -- Qwen3-VL ------------------------------------------------------------------------------------
def test_qwen3_layout_blocks_and_deepstack(tiny_models, clip):
    loaded = tiny_models("qwen3-vl")
    encoded = encode(loaded, clip)
    layout = encoded.layout
    t, h, w = layout.grid
    assert layout.frames_per_step == 2 and t == 4  # 8 frames, one token frame per pair
    runs = layout.segment_runs(2)
    assert len(runs) == t and all(b - a == h * w for a, b in runs)
    assert all(b < a for (_, b), (a, _) in zip(runs, runs[1:]))  # timestamp text between blocks
    extra = encoded.extra
    assert torch.equal(extra["visual_pos_masks"][0].nonzero().flatten(), layout.indices)
    assert len(extra["deepstack_visual_embeds"]) == loaded.adapter.min_layer == 3
    assert all(e.shape[0] == layout.num_visual for e in extra["deepstack_visual_embeds"])
    assert encoded.position_ids.shape == (3, 1, layout.seq_len)
    assert encoded.next_position.flatten().tolist() == [int(encoded.position_ids.max()) + 1] * 3


@pytest.mark.parametrize("max_pixels", [64 * 64, 128 * 128])
def test_qwen3_max_pixels_bounds_each_frame(tiny_models, max_pixels):
    """Qwen3-VL's processor budgets pixels per clip; sharp's --max-pixels stays per frame."""
    loaded = tiny_models("qwen3-vl")
    inputs = engine.prepare(loaded, make_clip(frames=8, height=256, width=256), "what?", max_pixels)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    patch = loaded.model.config.vision_config.patch_size
    assert t == 4 and h * w * patch**2 == max_pixels  # square frames: the bound is met exactly


def test_qwen3_refuses_k_below_3_and_says_why(tiny_models, clip):
    loaded = tiny_models("qwen3-vl")
    with pytest.raises(UsageError, match=r"--layer must be >= 3 .*DeepStack"):
        ask(loaded, clip, "what?", loaded.resolve_prune(PruneConfig(method="fastv", layer=2)), max_new_tokens=2)
    answer = ask(loaded, clip, "what?", loaded.resolve_prune(PruneConfig(method="none", layer=2)), max_new_tokens=3,
                        max_pixels=56 * 56 * 4)  # nothing pruned: K does not matter
    assert answer.prefill.kept is None and answer.tokens


def test_qwen3_decoding_continues_after_a_pruned_prefill(tiny_models, clip):
    loaded = tiny_models("qwen3-vl")
    cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.25, layer=prune_layer(loaded)))
    answer = ask(loaded, clip, "what colour is the ball?", cfg, max_new_tokens=5, max_pixels=56 * 56 * 4)
    assert len(answer.tokens) >= 2 and answer.text


# -- through the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("method", ["none", "fastv", "random", "sharp"])
def test_ask_json_every_method(model_dirs, video, family, method):
    result = sharp("ask", video, "what colour is the ball?", "-m", model_dirs[family], *SMALL, "--json",
                   "--method", method, "--ratio", "0.25", *_layer_args(family))
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    n = record["visual_tokens_total"]
    assert record["answer"] and record["method"] == method and record["frames"] == 8
    if method == "none":
        assert record["visual_tokens_kept"] == n and record["kv_cache_bytes"] == record["kv_cache_bytes_unpruned"]
    else:
        assert record["visual_tokens_kept"] == keep_count(0.25, n)
        assert record["layer"] == (3 if family == "qwen3-vl" else 2)
        assert record["kv_cache_bytes"] < record["kv_cache_bytes_unpruned"]
    if family == "llava-onevision":
        assert record["token_grid"] == [8, 4, 4] and record["sequence_tokens"] > n + 1


@pytest.mark.parametrize("family, expected", [("qwen3-vl", 3), ("llava-onevision", 2)])
def test_default_layer_is_two_or_the_familys_smallest(model_dirs, video, family, expected):
    result = sharp("ask", video, "what?", "-m", model_dirs[family], *SMALL, "--json", "--ratio", "0.25")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["layer"] == expected


@pytest.mark.parametrize("model", ["dir", "Qwen/Qwen3-VL-8B-Instruct"])
def test_qwen3_layer_2_is_a_usage_error_before_loading(model_dirs, video, model):
    extra = [] if model == "dir" else ["--random-weights"]  # 8B: would take minutes if it loaded
    target = model_dirs["qwen3-vl"] if model == "dir" else model
    result = sharp("ask", video, "what?", "-m", target, *SMALL, *extra, "--layer", "2")
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "--layer must be >= 3" in line and "DeepStack" in line


def test_bench_checks_the_layer_before_building_the_model():
    result = sharp("bench", "-m", "Qwen/Qwen3-VL-8B-Instruct", "--random-weights", "--layer", "2", "--frames", "2")
    assert result.exit_code == 2 and "DeepStack" in result.stderr


@pytest.mark.parametrize("family", NEW)
def test_bench_runs_every_method(model_dirs, family):
    result = sharp("bench", "-m", model_dirs[family], "--frames", "4", "--height", "56", "--width", "56",
                   "--ratio", "0.25", "--iters", "1", "--warmup", "0", "--decode-tokens", "2", "--json",
                   *_layer_args(family))
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [r["method"] for r in rows] == ["transformers", "none", "fastv", "random", "sharp"]
    n = rows[1]["visual_tokens_total"]
    assert all(r["visual_tokens_kept"] == keep_count(0.25, n) for r in rows[2:])
    assert rows[0]["tokens_agree"] is True  # sharp's unpruned decode gives generate()'s tokens


# -- token budgets (models/budget.py) ------------------------------------------------------------
def _processor(config):
    adapter = adapter_for(config)
    tokenizer = synthetic_tokenizer(adapter.special_tokens(config), config.text_config.vocab_size)
    return adapter, adapter.build_processor(tokenizer, config)


def _processor_grid(adapter, processor, config, frames, height, width, max_pixels):
    inputs = adapter.processor_inputs(processor, adapter.prompt(processor, "what?"),
                                      make_clip(frames=frames, height=height, width=width,
                                                content=torch.zeros(frames, height, width, 3, dtype=torch.uint8)
                                                .numpy()), max_pixels)
    if "video_grid_thw" not in inputs:  # LLaVA: frames x the pooled grid
        return (inputs["pixel_values_videos"].shape[1], *adapter.token_grid(config, frames, height, width)[1:])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = config.vision_config.spatial_merge_size
    return t, h // merge, w // merge


@pytest.mark.parametrize("name", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl", "llava-onevision",
                                  "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"])
def test_token_estimate_is_what_the_processor_makes(name):
    """The estimate made from frame count and size alone (before decoding) is the grid the video
    processor then produces, over sizes, aspect ratios, frame counts (odd ones, one frame) and
    --max-pixels, for the tiny configs and the real checkpoints' patch sizes."""
    from sharp_cli.models.random_init import tiny_config

    config = load_config(name) if "/" in name else tiny_config(name)
    adapter, processor = _processor(config)
    for (h, w), frames, max_pixels in [((56, 56), 1, None), ((84, 112), 3, None), ((30, 200), 8, None),
                                       ((100, 33), 2, 12544), ((360, 640), 17, None), ((360, 640), 4, 50000),
                                       ((84, 112), 8, 12544), ((56, 56), 300, None)]:
        if adapter.family == "llava-onevision" and max_pixels:
            continue
        assert adapter.token_grid(config, frames, h, w, max_pixels) == \
            _processor_grid(adapter, processor, config, frames, h, w, max_pixels), (h, w, frames, max_pixels)


def test_qwen25_default_budget_is_the_reference_not_the_checkpoints_file():
    """Qwen2.5-VL-7B's shipped preprocessor_config.json allows 12,845,056 pixels a frame; given to
    the processor as is, 1080p frames keep 39 x 69 tokens each (32 frames: 43,056 tokens). sharp's
    default is qwen-vl-utils' budget: 20 x 36 (32 frames: 11,520), 4K the same."""
    from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

    from sharp_cli.models.budget import estimate
    from sharp_cli.models.random_init import CONFIG_DIR

    config = load_config("Qwen/Qwen2.5-VL-7B-Instruct")
    adapter, processor = _processor(config)
    shipped = json.loads((CONFIG_DIR / "Qwen--Qwen2.5-VL-7B-Instruct" / "preprocessor_config.json").read_text())
    processor.video_processor = Qwen2VLVideoProcessor(**{k: shipped[k] for k in (
        "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")})
    assert processor.video_processor.size["longest_edge"] == 12_845_056
    assert _processor_grid(adapter, processor, config, 2, 1080, 1920, None) == (1, 20, 36)
    assert adapter.token_grid(config, 32, 1080, 1920) == adapter.token_grid(config, 32, 2160, 3840) == (16, 20, 36)
    assert estimate(adapter, config, 32, 1080, 1920).visual == 11_520
    assert adapter.visual_tokens(config, 768, 1080, 1920) <= 768 // 2 * 168  # 1.05 x 128 tokens a frame at most
    assert adapter.token_grid(config, 32, 392, 784) == (16, 14, 28)  # the README's 6,272-token layout


def test_qwen3_default_budget_is_its_video_preprocessor_config():
    from sharp_cli.models.random_init import CONFIG_DIR

    config = load_config("Qwen/Qwen3-VL-8B-Instruct")
    shipped = json.loads((CONFIG_DIR / "Qwen--Qwen3-VL-8B-Instruct" / "video_preprocessor_config.json").read_text())
    assert shipped["size"] == {"longest_edge": 24576 * 32 * 32, "shortest_edge": 4096}
    adapter = adapter_for(config)
    assert adapter.token_grid(config, 32, 1080, 1920) == (16, 20, 36)
    # the clip budget counts every frame, two to a token: at most ~12,288 tokens (64 frames: 32 x 14 x 26)
    assert adapter.token_grid(config, 64, 1080, 1920) == (32, 14, 26)
    # 768 frames: the per-frame floor (1.05 x 128 tokens' worth) outweighs the clip's budget, as in
    # the reference, so --fps runs this long need --max-frames or --max-pixels lowered
    assert adapter.token_grid(config, 768, 1080, 1920) == (384, 8, 15)


def test_sequence_estimate_counts_text_and_new_tokens():
    from sharp_cli.models.budget import check

    config = load_config("llava-hf/llava-onevision-qwen2-7b-ov-hf")  # 32k context, 196 tokens a frame
    adapter = adapter_for(config)
    fits = check(adapter, config, 160, 360, 640, question="what?", max_new_tokens=128)
    assert fits.visual == 160 * 196 and fits.sequence < 32768
    with pytest.raises(UsageError, match=r"over the model's 32,768-token context .*lower --frames"):
        check(adapter, config, 600, 360, 640, question="what?", max_new_tokens=128)
    with pytest.raises(UsageError, match=r"6,272 visual tokens .* exceed --max-visual-tokens 6,000"):
        check(adapter, config, 32, 360, 640, max_visual_tokens=6000)


# -- the video processor on the model's device (engine.processing_device) -------------------------------
@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct",
                                  "Qwen/Qwen3-VL-8B-Instruct", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"])
def test_each_family_hands_its_video_processor_the_device(name, monkeypatch):
    # On CUDA the frames are resized and normalised there; the device must reach transformers' video
    # processor (not be dropped on the way) and change nothing but where the work is done.
    config = load_config(name)
    adapter, processor = _processor(config)
    seen = []
    video_processor = type(processor.video_processor)
    real = video_processor._prepare_input_videos

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(video_processor, "_prepare_input_videos", spy)
    clip, prompt = make_clip(frames=4, height=64, width=96), adapter.prompt(processor, "what?")
    plain = adapter.processor_inputs(processor, prompt, clip, 64 * 96)
    placed = adapter.processor_inputs(processor, prompt, clip, 64 * 96, torch.device("cpu"))
    assert seen == [None, "cpu"]
    assert plain.keys() == placed.keys()
    assert all(torch.equal(plain[k], placed[k]) for k in plain if isinstance(plain[k], torch.Tensor))


def test_the_processor_works_on_the_gpu_when_switched_on(monkeypatch):
    class Fake:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(engine, "PROCESS_ON_GPU_DEFAULT", "1")
    assert engine.processing_device(Fake()) == torch.device("cuda", 0)
    monkeypatch.setenv(engine.PROCESS_ON_GPU, "0")
    assert engine.processing_device(Fake()) is None
    monkeypatch.setenv(engine.PROCESS_ON_GPU, "1")
    Fake.device = torch.device("cpu")
    assert engine.processing_device(Fake()) is None

"""scripts.plant_sinks: the planted circuit makes the `system` token a sink at layers >= from_layer
only, leaves every other token's hidden dimension j at zero, and its shares are measured against
transformers' own eager attention weights (output_attentions), not the capture the calibration uses."""

import pytest
import torch

from scripts.plant_sinks import SINK_TOKEN, calibrate, plant
from scripts.small_checks import inputs_of, language_check_rows
from scripts.small_data import CHECK_SEED, Batcher, Items, build_processor, pack, small_config, unpack


@pytest.fixture(scope="module")
def planted():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = small_config(hidden=64, layers=4, heads=4, kv_heads=2, vision_depth=2, vision_hidden=32,
                          rope_theta=1e6, mrope_section=(2, 3, 3))
    config.text_config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    sink = build_processor(config).tokenizer.convert_tokens_to_ids(SINK_TOKEN)
    info = plant(model, sink, target=0.7, from_layer=2)
    video = Items(CHECK_SEED, ["colour"], 0.0, 0.0, per_seed=10**9, frames=32, answers=False)
    rows = [video[0], video[1]] + language_check_rows(2)
    calibrate(model, rows, info, rounds=4)
    return model, config, sink, info, rows


def eager_run(model, config, row):
    batch = Batcher(config, answers=False, device=torch.device("cpu"))(unpack(pack([row]), "cpu"))
    model.config.text_config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(**inputs_of(batch), output_attentions=True, output_hidden_states=True)
    finally:
        model.config.text_config._attn_implementation = "sdpa"
    return batch["input_ids"][0], out


def test_the_sink_takes_the_target_share_from_the_planted_layer_on(planted):
    model, config, sink, info, rows = planted
    shares = []
    for row in rows:
        ids, out = eager_run(model, config, row)
        at = int((ids == sink).nonzero()[0, 0])
        shares.append(torch.stack([a[0, :, -1, at] for a in out.attentions]))  # (layers, heads)
    share = torch.stack(shares).mean(0)
    assert share[:2].max() < 0.2  # no sink before from_layer
    assert share[2:].mean(-1).sub(0.7).abs().max() < 0.12  # calibrated to the target on these rows


def test_only_the_sink_carries_the_massive_dimension_at_every_layer(planted):
    model, config, sink, info, rows = planted
    ids, out = eager_run(model, config, rows[0])
    j, at = info["dimension"], int((ids == sink).nonzero()[0, 0])
    for h in out.hidden_states[:-1]:  # the last is after the final norm
        state = h[0, at]
        assert state[j] ** 2 / (state**2).sum() > 0.99
        others = torch.cat([h[0, :at, j], h[0, at + 1:, j]])
        assert others.abs().max() == 0

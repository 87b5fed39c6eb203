"""scripts.plant_priors: the planted circuit makes the `system` token a sink at layers >= from_layer
only, leaves every other token's hidden dimension j at zero, and its shares are measured against
transformers' own eager attention weights (output_attentions), not the capture the calibration uses."""

import pytest
import torch

from scripts.plant_priors import SINK_TOKEN, calibrate_sinks, plant_sinks
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
    info = plant_sinks(model, sink, target=0.7, from_layer=2)
    video = Items(CHECK_SEED, ["colour"], 0.0, 0.0, per_seed=10**9, frames=32, answers=False)
    rows = [video[0], video[1]] + language_check_rows(2)
    calibrate_sinks(model, rows, info, rounds=4)
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


def test_recency_makes_attention_rise_with_the_key_position():
    """A run of one repeated token: every layer-1 key is the same vector but for its rotation, so
    the last row's attention order is RoPE's alone; planted, it rises with the key's position."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from scripts.plant_priors import plant_recency

    torch.manual_seed(0)
    config = small_config(hidden=64, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_hidden=32,
                          rope_theta=1e6, mrope_section=(6, 1, 1))
    config.text_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    ids = torch.full((1, 48), 7)

    def last_row():
        with torch.no_grad():
            return model(input_ids=ids, output_attentions=True).attentions[1][0, :, -1].mean(0)  # (48,)

    before = last_row()
    info = plant_recency(model, [1], pair=5, slope=0.5)
    after = last_row()
    assert not (before.diff() > 0).all()
    assert (after.diff() > 0).all()
    assert info["radians_per_position"] == pytest.approx(1e6 ** (-10 / 16), rel=1e-3)
    with pytest.raises(ValueError, match="temporal band"):
        plant_recency(model, [1], pair=6, slope=0.5)


def test_a_planted_model_is_calibrated_again_from_where_its_weights_are(planted, tmp_path):
    """Calibration reads each head's present sink logit off the weights (key, bias, norm), so a
    trained or re-targeted model moves to the new share instead of starting over."""
    import copy
    import json

    from scripts.small_circuits import planted_before

    model, config, sink, info, rows = planted
    model = copy.deepcopy(model)
    with torch.no_grad():  # as training might: the planted key and the norm's weight on j moved
        for layer in model.model.language_model.layers[2:]:
            layer.input_layernorm.weight[info["dimension"]] *= 1.5
    again = dict(info, target=0.4)
    shares = torch.tensor(calibrate_sinks(model, rows, again, rounds=4))
    assert shares[2:].mean(-1).sub(0.4).abs().max() < 0.12
    recency = [{"layers": [1], "rotary_pair": 5}]
    history = [{"planted_sinks": dict(info, target=0.9), "planted_recency": recency}, {"steps": 5}]
    (tmp_path / "training.json").write_text(json.dumps({"planted_sinks": info, "history": history}))
    found = planted_before(tmp_path)  # the newest plant of each kind: sinks re-targeted, recency kept
    assert found["planted_sinks"]["target"] == info["target"] and found["planted_recency"] == recency
    assert planted_before(tmp_path.parent) == {}


def test_a_hinge_is_flat_before_the_query_and_rises_after_it():
    """Keys placed after the query's position (as a video's last frames are in Qwen2.5-VL's M-RoPE,
    where the prompt's last token sits inside the video's temporal span): one repeated token, so the
    keys differ by rotation alone. Planted as a hinge on pairs 2-4, the last row's log-attention is
    flat over keys well before the query and rises by ~slope per token frame after it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from scripts.plant_priors import plant_hinge

    torch.manual_seed(0)
    config = small_config(hidden=128, layers=2, heads=4, kv_heads=2, vision_depth=1, vision_hidden=32,
                          rope_theta=1e6, mrope_section=(8, 4, 4))
    config.text_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    length, query = 80, 50  # the last token sits at position 50; keys 51..79 come after it
    ids = torch.full((1, length), 7)
    positions = torch.arange(length).clone()
    positions[-1] = query
    position_ids = positions.view(1, 1, -1).expand(3, 1, -1)

    def log_attention():
        with torch.no_grad():
            out = model.model.language_model(input_ids=ids, position_ids=position_ids, output_attentions=True)
        return out.attentions[1][0, :, -1].mean(0).log()  # (length,) by key index = key position

    def rise(a):  # log-attention 10..16 positions after the query against 10..16 before it
        return float(a[query + 10:query + 17].mean() - a[query - 16:query - 9].mean())

    def drift(a):  # before the query: 40..30 positions back against 16..10 back
        return float(a[query - 40:query - 29].mean() - a[query - 16:query - 9].mean())

    before = log_attention()
    records = plant_hinge(model, [1], [2, 3, 4], slope=0.5)
    after = log_attention()
    assert abs(rise(before)) < 0.5
    assert rise(after) > 2.5  # ~0.25 logits a position over ~26 positions, less the fit's error
    assert abs(drift(after)) < 0.6
    assert [r["rotary_pair"] for r in records] == [2, 3, 4] and all(r["layers"] == [1] for r in records)

"""`sharp diagnose`: the last row's attention it measures, and the checks it reports."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.evaluate import diagnose, synth

runner = CliRunner()


def test_captured_last_row_equals_eager_attention(tiny_models):
    """The capture's (B, H, L) softmax equals the last row of transformers' own eager attention
    weights (an independent reference: materialised L x L, fine at this size)."""
    from conftest import encode, make_clip

    loaded = tiny_models("qwen2.5-vl")
    encoded = encode(loaded, make_clip(frames=8))
    text = loaded.adapter.text_model(loaded.model)
    before = text.config._attn_implementation
    text.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False,
                         output_attentions=True).attentions
            text.config._attn_implementation = before
            with diagnose.capture(text.config, [1, 2]) as rec:
                text(inputs_embeds=encoded.inputs_embeds, position_ids=encoded.position_ids, use_cache=False)
    finally:
        text.config._attn_implementation = before
    for layer in (1, 2):
        torch.testing.assert_close(rec.probs[layer][0], eager[layer][0, :, -1].float(), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def basic_items(tmp_path_factory):
    return synth.write(tmp_path_factory.mktemp("diag"), 2, seed=0)


def test_diagnose_flags_a_one_hot_model(basic_items):
    """sharp-tiny's shallow attention is near one-hot (docs/eval.md): the checks must say so."""
    result = runner.invoke(app, ["diagnose", str(basic_items), "-m", "sharp-tiny", "--n", "2", "--no-accuracy",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    checks = {c["check"]: c for c in out["checks"]}
    zeros = checks["exact zeros (layers 1-2)"]
    assert not zeros["passed"] and zeros["value"] > 0.3
    assert not checks["shallow entropy (layers 1-2)"]["passed"]
    assert out["passed"] is False and out["pruning"] == {}
    layers = out["attention"]["content"]
    assert set(layers) == {str(n) for n in range(8)} and all(0 <= v["entropy"] <= 1 for v in layers.values())
    strict = runner.invoke(app, ["diagnose", str(basic_items), "-m", "sharp-tiny", "--n", "1", "--no-accuracy",
                                 "--strict"])
    assert strict.exit_code == 1 and "acceptance checks failed" in strict.output


def test_diagnose_pruning_checks_answer_every_cell(basic_items, model_dirs):
    """A random model: spread attention (no exact zeros), and the three pruning checks computed."""
    result = runner.invoke(app, ["diagnose", str(basic_items), "-m", str(model_dirs["qwen2.5-vl"]), "--n", "2",
                                 "--frames", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    checks = {c["check"]: c for c in out["checks"]}
    assert checks["exact zeros (layers 1-2)"]["value"] == 0
    assert out["pruning"]["questions"] == 2
    assert set(out["pruning"]["accuracy"]) == {"none r=1.0 K=2", "fastv r=0.5 K=2", "fastv r=0.15 K=2",
                                               "fastv r=0.15 K=3"}
    assert sum("FastV" in name for name in checks) == 3
    unpruned = out["pruning"]["accuracy"]["none r=1.0 K=2"]
    for name, check in checks.items():  # the pruning checks carry their paired bootstrap interval
        if "share of unpruned" in name:  # a share of nothing has none
            assert ("interval" in check) is (unpruned > 0)
            assert "interval" not in check or check["interval"][0] <= check["interval"][1]
    gap = next(c for name, c in checks.items() if "minus loss" in name)
    assert gap["interval"][0] <= gap["value"] <= gap["interval"][1]
    items = [json.loads(line) for line in basic_items.read_text().splitlines()[:2]]
    by = out["pruning"]["by_category"]  # each task's own, and together the overall accuracy
    assert set(by) == {i["category"] for i in items} and sum(c["questions"] for c in by.values()) == 2
    for cell, overall in out["pruning"]["accuracy"].items():
        assert sum(c[cell] * c["questions"] for c in by.values()) / 2 == overall

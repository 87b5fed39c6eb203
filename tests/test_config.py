"""prune/config.py: a question's PruneConfig is resolved for the model once (K chosen, checked
against the family and the depth), where a command turns options into it; the phases assert on it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from conftest import encode, make_clip
from sharp_cli import answer, engine, prior_pass
from sharp_cli.cli import app
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.prior import PriorStore
from sharp_cli.scheduler import Request, Scheduler
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]
PIXELS = 56 * 56 * 4


def test_resolving_sets_k_and_a_copy_is_unresolved_again(tiny_models):
    qwen3 = tiny_models("qwen3-vl")
    cfg = qwen3.resolve_prune(PruneConfig())
    assert cfg.resolved and cfg.layer == 3 and not PruneConfig().resolved  # the family's smallest K
    assert qwen3.resolve_prune(PruneConfig(method="none")).layer == 3
    evs = tiny_models("qwen2.5-vl").resolve_prune(PruneConfig(method="evs", layer=2))
    assert evs.layer == 0 and evs.resolved
    # A changed copy may need another K (evs: 0), so it is not resolved until resolved again.
    assert not replace(cfg, method="evs").resolved and not replace(cfg).resolved
    assert cfg == replace(cfg) and cfg.as_dict() == replace(cfg).as_dict()  # records and keys unchanged


def _phases(tiny):
    clip = make_clip()
    encoded = encode(tiny, clip)
    unresolved = PruneConfig(method="sharp", ratio=0.25, layer=2)
    return {
        "answer.ask": lambda: answer.ask(tiny, clip, "what?", unresolved, max_new_tokens=2, max_pixels=PIXELS),
        "answer.begin": lambda: answer.begin(tiny, clip, "what?", unresolved, max_new_tokens=2, max_pixels=PIXELS),
        "prior_pass.positional_prior": lambda: prior_pass.positional_prior(
            tiny, clip, encoded, unresolved, PriorStore(use_disk=False), PIXELS),
        "engine.prefill": lambda: engine.prefill(tiny, encoded, unresolved),
        "Scheduler.submit": lambda: Scheduler(tiny, max_batch=2).submit(
            Request(clip, "what?", unresolved, max_new_tokens=2, max_pixels=PIXELS)),
    }


@pytest.mark.parametrize("phase", ["answer.ask", "answer.begin", "prior_pass.positional_prior", "engine.prefill",
                                   "Scheduler.submit"])
def test_a_phase_handed_an_unresolved_config_fails_loudly(tiny, phase):
    with pytest.raises(AssertionError, match=rf"{phase} needs a PruneConfig resolved .*loaded\.resolve_prune"):
        _phases(tiny)[phase]()


@pytest.fixture
def counted(monkeypatch):
    """Every resolution of a config (PruneConfig.resolved_for), and the configs engine.prefill got."""
    seen = {"resolved": 0, "prefill": []}
    real_resolve, real_prefill = PruneConfig.resolved_for, engine.prefill

    def resolve(self, *args, **kwargs):
        seen["resolved"] += 1
        return real_resolve(self, *args, **kwargs)

    def prefill(loaded, encoded, cfg, *args, **kwargs):
        seen["prefill"].append(cfg)
        return real_prefill(loaded, encoded, cfg, *args, **kwargs)

    monkeypatch.setattr(PruneConfig, "resolved_for", resolve)
    monkeypatch.setattr(engine, "prefill", prefill)
    return seen


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("v") / "a.mp4", n_frames=16, fps=8, size=(112, 84))


@pytest.mark.parametrize("family, k", [("qwen2.5-vl", 2), ("qwen3-vl", 3)])
def test_ask_resolves_k_once_and_the_engine_gets_that_config(model_dirs, video, counted, family, k):
    result = runner.invoke(app, ["ask", str(video), "what?", "-m", str(model_dirs[family]), *SMALL, "--json"])
    assert result.exit_code == 0, result.stderr
    assert counted["resolved"] == 1  # before torch loads, from config.json; never again on the way down
    assert [(c.resolved, c.layer) for c in counted["prefill"]] == [(True, k)]
    assert json.loads(result.stdout)["layer"] == k


def test_batch_resolves_the_defaults_once_and_each_changed_item_once(model_dirs, video, counted, tmp_path):
    items = tmp_path / "items.jsonl"
    rows = [{"video": str(video), "question": "what?"}, {"video": str(video), "question": "how many?"},
            {"video": str(video), "question": "what?", "method": "fastv", "layer": 3},
            {"video": str(video), "question": "what?", "method": "evs"}]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["batch", str(items), "-m", str(model_dirs["qwen2.5-vl"]), *SMALL, "-q"])
    assert result.exit_code == 0, result.stderr
    assert counted["resolved"] == 1 + 2  # the command's defaults, then the two items that change them
    assert [(c.method, c.layer, c.resolved) for c in counted["prefill"]] == [
        ("sharp", 2, True), ("sharp", 2, True), ("fastv", 3, True), ("evs", 0, True)]
    assert [json.loads(line)["layer"] for line in result.stdout.splitlines()] == [2, 2, 3, 0]

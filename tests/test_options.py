"""The pruning options are declared once (PruneConfig's fields) and reach every command the same way."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.options import prune_options
from sharp_cli.prune.config import PruneConfig
from videos import make_video

runner = CliRunner()
SKIPPED = {"bench": {"method", "ratio"}, "eval": {"method", "ratio", "seed"}}  # eval: --seed is its first tie seed


def _options(command_name: str) -> dict:
    command = get_command(app).commands[command_name]
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("command_name", ["ask", "bench", "eval", "batch", "serve"])
def test_every_command_takes_every_pruning_option_with_the_fields_default_and_help(command_name):
    params = _options(command_name)
    for f in fields(PruneConfig):
        if f.name in SKIPPED.get(command_name, ()):
            continue
        assert f.name in params, f"{command_name} lacks --{f.name.replace('_', '-')}"
        param = params[f.name]
        assert param.default == f.default and f.default is not MISSING
        assert param.help == f.metadata["help"]
        flag = "--" + f.name.replace("_", "-")
        assert flag in param.opts
        if isinstance(f.default, bool):
            assert "--no-" + f.name.replace("_", "-") in param.secondary_opts


def test_the_decorator_builds_the_config_from_the_flags():
    """A fresh command: the values given on the command line arrive as one PruneConfig, in place of
    the `prune` parameter; the command's own parameters are untouched."""
    seen = {}
    probe = typer.Typer()

    @probe.command()
    @prune_options(skip=("ratio",))
    def command(name: str = "x", prune: PruneConfig = PruneConfig(), after: int = 1):
        seen.update(name=name, prune=prune, after=after)

    result = runner.invoke(probe, ["--name", "y", "--method", "evs", "--no-registers", "--register-ratio", "20",
                                   "--debias-floor", "0.5", "--layer", "3", "--dedup-window", "2", "--after", "5"])
    assert result.exit_code == 0, result.output
    assert seen["name"] == "y" and seen["after"] == 5
    assert seen["prune"] == PruneConfig(method="evs", registers=False, register_ratio=20.0, debias_floor=0.5,
                                        layer=3, dedup_window=2)
    assert "--ratio" not in runner.invoke(probe, ["--help"]).output


def test_ask_refuses_evs_on_qwen3_vl_in_one_line(model_dirs, tmp_path):
    video = make_video(tmp_path / "clip.mp4", n_frames=16, fps=8, size=(112, 84))
    result = runner.invoke(app, ["ask", str(video), "what?", "-m", str(model_dirs["qwen3-vl"]), "--frames", "8",
                                 "--method", "evs"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "evs is not supported on Qwen3-VL" in result.stderr


def test_ask_runs_evs_and_reports_layer_zero(model_dirs, tmp_path):
    video = make_video(tmp_path / "clip.mp4", n_frames=16, fps=8, size=(112, 84))
    result = runner.invoke(app, ["ask", str(video), "what?", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "8",
                                 "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "2", "--method", "evs",
                                 "--ratio", "0.5", "--layer", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["method"] == "evs" and record["layer"] == 0
    assert record["visual_tokens_kept"] == max(1, int(0.5 * record["visual_tokens_total"] + 0.5))


def test_bench_runs_evs_with_every_layer_on_the_kept_tokens(model_dirs):
    from sharp_cli.measure import layer_flops, text_dims
    from sharp_cli.models.random_init import tiny_config

    result = runner.invoke(app, ["bench", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "8", "--height", "56",
                                 "--width", "112", "--methods", "none,evs", "--ratio", "0.5", "--iters", "1",
                                 "--warmup", "0", "--decode-tokens", "2", "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    base, evs = json.loads(result.stdout)["rows"]
    assert evs["method"] == "evs" and evs["layer"] == 0
    dims = text_dims(tiny_config("qwen2.5-vl"))
    kept_len = base["sequence_tokens"] - base["visual_tokens_total"] + evs["visual_tokens_kept"]
    assert evs["prefill_flops"] == pytest.approx(dims["layers"] * layer_flops(kept_len, dims))


def test_bench_refuses_evs_on_qwen3_vl_before_loading():
    result = runner.invoke(app, ["bench", "-m", "Qwen/Qwen3-VL-8B-Instruct", "--random-weights", "--frames", "2",
                                 "--methods", "none,evs"])
    assert result.exit_code == 2 and "evs is not supported on Qwen3-VL" in result.stderr

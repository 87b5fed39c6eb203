"""scripts/train_sharp_tiny.py end to end at two steps: it trains, saves a folder that the real
loading path (`from_pretrained`) reads, and `sharp ask` answers with it. The weights are not
shipped (docs/eval.md, "sharp-tiny"), so `-m sharp-tiny` must say so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from sharp_cli.cli import app
from sharp_cli.loading import SHARP_TINY

ROOT = Path(__file__).resolve().parent.parent


def test_training_script_saves_a_model_sharp_ask_loads(tmp_path):
    out = tmp_path / "tiny"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_sharp_tiny.py"), "--steps", "2", "--batch", "2",
                          "--eval-every", "2", "--eval-items", "4", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "model.safetensors").stat().st_size < 30 * 2**20 and (out / "training.json").exists()
    from sharp_cli.evaluate.synth import _encode, make_item

    frames, item = make_item(0, 0)
    _encode(frames, tmp_path / "clip.mp4", 8.0)
    result = CliRunner().invoke(app, ["ask", str(tmp_path / "clip.mp4"), item["question"], "-m", str(out),
                                      "--device", "cpu", "--max-new-tokens", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    assert '"visual_tokens_total": 256' in result.stdout  # 32 frames of 128 px -> 16 x 4 x 4 tokens


def test_sharp_tiny_missing_is_one_line(tmp_path):
    if (SHARP_TINY / "model.safetensors").exists():
        return  # shipped after all: nothing to refuse
    from videos import make_video

    video = make_video(tmp_path / "v.mp4", n_frames=4)  # a real video: it is checked before the model
    result = CliRunner().invoke(app, ["ask", str(video), "what?", "-m", "sharp-tiny"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "sharp-tiny is not in this install" in result.stderr

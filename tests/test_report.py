"""What a run cost, as tables (sharp_cli/report.py): they fit a narrow stderr without cutting a value,
and drop columns by priority, saying which."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from sharp_cli.cli import app
from videos import make_video

runner = CliRunner()
SMALL = ["--frames", "8", "--max-pixels", str(56 * 56 * 4), "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("fc") / "clip.mp4", n_frames=16, fps=8, size=(112, 84)))


def sharp(*args):
    return runner.invoke(app, [str(a) for a in args])


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

"""scripts/tables.py: `eval` runs every table of a K and writes one markdown table per K; `bench`
turns `sharp bench` results into markdown tables, or says why a file is not one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from scripts import tables
from sharp_cli.cli import app
from sharp_cli.evaluate import synth

REPO = Path(__file__).resolve().parent.parent


def test_tables_of_one_k_in_one_markdown_file(model_dirs, tmp_path, monkeypatch):
    items = synth.write(tmp_path / "data", 2, seed=0, frames=16, size=64)
    monkeypatch.setattr(tables, "TABLES", [
        ("main", "none,fastv,warp", []),  # warp: a method this build does not have
        ("no-dedup", "sharp", ["--no-dedup"]),  # compared with the main run's none and fastv
        ("broken", "sharp", ["--no-such-flag"]),
    ])
    out = tmp_path / "out"
    code = tables.main(["eval", "--model", str(model_dirs["qwen2.5-vl"]), "--layers", "2", "--out", str(out),
                             "--data", str(items), "--items", "2", "--ratios", "0.5", "--tie-seeds", "1",
                             "--", "--frames", "8", "--max-pixels", "12544"])
    assert code == 1  # one run failed; the others ran and the page is written
    page = (out / "k2.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in page.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["none", "fastv", "sharp no-dedup"]
    # the ablation's row is compared with the main run's fastv and none answers
    main = {(r["method"], r["item"]): r["correct"] for r in map(json.loads, (out / "k2-main.jsonl").open())}
    abl = {r["item"]: r["correct"] for r in map(json.loads, (out / "k2-no-dedup.jsonl").open())
           if r["method"] == "sharp"}
    diff = 100 * sum(abl[i] - main[("fastv", i)] for i in abl) / len(abl)
    assert rows["sharp no-dedup"][4].startswith(f"{diff:+.1f} [")
    assert "left out (not in this build): warp" in page
    assert "broken (not run: " in page and "--no-such-flag" in page
    assert "`sharp eval " in page and "--no-dedup" in page


def test_ablation_rows_compare_with_the_main_runs_fastv_and_none(tmp_path):
    """Fabricated results: main fastv right on all 4 questions, main sharp on 1, the ablation run's own
    fastv on none, its sharp on 2. The page compares the ablation with the main fastv (-50 points), not
    its own (+50), and with the main sharp (+25)."""
    from argparse import Namespace

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "video": "v.mp4", "question": "q?", "options": ["a", "b"],
                                        "answer": "A"}) + "\n" for i in range(4)))

    def write(name, marks):
        lines = [{"item": f"q{i}", "method": m, "ratio": r, "seed": 0, "correct": bool(ok), "prediction": "A"}
                 for m, r, oks in marks for i, ok in enumerate(oks)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (tmp_path / f"{name}.json").write_text(json.dumps({"seeds": {"first": 0, "tie": 1, "random": 5}}))
        return {"name": name, "methods": sorted({m for m, _, _ in marks}), "unknown": [], "command": "sharp eval",
                "error": None, "seconds": 1.0, "results": tmp_path / f"{name}.jsonl",
                "summary": tmp_path / f"{name}.json"}

    runs = [write("main", [("none", 1.0, [1, 1, 1, 0]), ("fastv", 0.5, [1, 1, 1, 1]), ("sharp", 0.5, [1, 0, 0, 0])]),
            write("no-dedup", [("none", 1.0, [0, 0, 0, 0]), ("fastv", 0.5, [0, 0, 0, 0]),
                               ("sharp", 0.5, [1, 0, 1, 0])])]
    args = Namespace(model="m", ratios="0.5", items=4, tie_seeds=1)
    page = tables.markdown(args, data, 2, runs)
    row = next(line for line in page.splitlines() if line.startswith("| sharp no-dedup"))
    cells = row.split(" | ")
    assert cells[2] == "50.0%" and cells[4].startswith("-50.0 [") and cells[5].startswith("-25.0 [")
    assert cells[6].startswith("+25.0 [")  # vs the main run's sharp
    main_sharp = next(line for line in page.splitlines() if line.startswith("| sharp | "))
    assert main_sharp.split(" | ")[6] == "-"  # the full method has no ablation to be compared with
    assert "seeds: 1 per score-based cell, 5 for random in the main table" in page


def test_bench_table_reads_every_result_or_says_why(model_dirs, tmp_path):
    cpu = tmp_path / "cpu-bench.json"
    result = CliRunner().invoke(app, ["bench", "-m", str(model_dirs["qwen2.5-vl"]), "--frames", "4", "--height", "56",
                                      "--width", "56", "--iters", "1", "--warmup", "0", "--decode-tokens", "0",
                                      "--methods", "none,fastv", "--output-json", str(cpu), "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(cpu.read_text())["rows"][0]["peak_memory_bytes"] is None  # a CPU run has none
    (tmp_path / "broken.json").write_text("{not json")
    # every bench result and `sharp ask` record kept from the H100 (other results there: checks, load bench)
    paths = sorted(str(p) for p in (REPO / "research" / "results").glob("h100-*.json")
                   if "ask" in p.name or "rows" in json.loads(p.read_text()))
    paths += [str(cpu), str(tmp_path / "broken.json")]
    out = subprocess.run([sys.executable, "-m", "scripts.tables", "bench", *paths], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    asks = [p for p in paths if "ask" in os.path.basename(p)]
    for path in asks:
        assert f"skipped {path}: a `sharp ask` result" in out.stderr
    assert f"skipped {tmp_path / 'broken.json'}: not JSON" in out.stderr
    assert out.stdout.count("| method | ratio |") == len(paths) - len(asks) - 1
    fastv = next(line for line in out.stdout.split(str(cpu))[1].splitlines() if line.startswith("| fastv |"))
    assert fastv.endswith("| - |")  # a CPU run has no peak GPU memory

"""scripts/eval_tables.py: one command runs every table of a K and writes one markdown table per K."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sharp_cli.evaluate import synth

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import eval_tables  # noqa: E402


def test_tables_of_one_k_in_one_markdown_file(model_dirs, tmp_path, monkeypatch):
    items = synth.write(tmp_path / "data", 2, seed=0, frames=16, size=64)
    monkeypatch.setattr(eval_tables, "TABLES", [
        ("main", "none,fastv,warp", []),  # warp: a method this build does not have
        ("no-dedup", "sharp", ["--no-dedup"]),  # compared with the main run's none and fastv
        ("broken", "sharp", ["--no-such-flag"]),
    ])
    out = tmp_path / "out"
    code = eval_tables.main(["--model", str(model_dirs["qwen2.5-vl"]), "--layers", "2", "--out", str(out),
                             "--data", str(items), "--items", "2", "--ratios", "0.5", "--tie-seeds", "1",
                             "--", "--frames", "8", "--max-pixels", "12544"])
    assert code == 1  # one run failed; the others ran and the page is written
    page = (out / "k2.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in page.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["none", "fastv", "sharp no-dedup"]
    # the ablation's row is compared with the main run's fastv and none answers
    main = {(r["method"], r["item"]): r["correct"] for r in map(json.loads, (out / "k2-main.jsonl").open())}
    abl = {r["item"]: r["correct"] for r in map(json.loads, (out / "k2-no-dedup.jsonl").open()) if r["method"] == "sharp"}
    diff = 100 * sum(abl[i] - main[("fastv", i)] for i in abl) / len(abl)
    assert rows["sharp no-dedup"][4].startswith(f"{diff:+.1f} [")
    assert "left out (not in this build): warp" in page
    assert "broken (not run: " in page and "--no-such-flag" in page
    assert "`sharp eval " in page and "--no-dedup" in page


def test_ablation_rows_compare_with_the_main_runs_fastv_and_none(tmp_path):
    """Fabricated results: main fastv right on all 4 questions, the ablation run's own fastv on none,
    its sharp on 2. The page compares sharp with the main fastv (-50 points), not its own (+50)."""
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

    runs = [write("main", [("none", 1.0, [1, 1, 1, 0]), ("fastv", 0.5, [1, 1, 1, 1])]),
            write("no-dedup", [("none", 1.0, [0, 0, 0, 0]), ("fastv", 0.5, [0, 0, 0, 0]), ("sharp", 0.5, [1, 0, 1, 0])])]
    args = Namespace(model="m", ratios="0.5", items=4, tie_seeds=1)
    page = eval_tables.markdown(args, data, 2, runs)
    row = next(line for line in page.splitlines() if line.startswith("| sharp no-dedup"))
    cells = row.split(" | ")
    assert cells[2] == "50.0%" and cells[4].startswith("-50.0 [") and cells[5].startswith("-25.0 [")
    assert "seeds: 1 per score-based cell, 5 for random" in page

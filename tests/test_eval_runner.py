"""Eval's runner (sharp_cli/evaluate/runner.py): the cells planned, the summary, results files
read back, and sharding over ranks (file-based wait and merge, resume, two real processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import SMALL, read_jsonl, sharp
from sharp_cli import jsonl
from sharp_cli.errors import UsageError
from sharp_cli.evaluate import formats, runner, summary


def _answers(path) -> list[tuple]:
    """What a results file says, without timings."""
    return [(r["item"], r["method"], r["ratio"], r["output"], r["prediction"], r["visual_tokens_kept"])
            for r in read_jsonl(path)]


# -- the runner ------------------------------------------------------------------------------------
def test_summary_accuracy_relative_and_categories():
    items = [formats.Item(str(i), "/v.mp4", "q", ["a", "b"], "A", "x" if i < 2 else "y") for i in range(4)]
    cells = [("none", 1.0, 0), ("sharp", 0.5, 0)]

    def rec(i, method, ratio, correct, **extra):
        return {"item": str(i), "method": method, "ratio": ratio, "seed": 0, "correct": correct,
                "category": items[i].category,
                "prediction": "A" if correct else None, "prefill_seconds": 0.5 if method == "none" else 0.25,
                "visual_tokens_kept": 100 if method == "none" else 50, "visual_tokens_total": 100, **extra}

    records = [rec(i, "none", 1.0, i != 3) for i in range(4)] + [rec(i, "sharp", 0.5, i == 0) for i in range(3)]
    records.append({"item": "3", "method": "sharp", "ratio": 0.5, "seed": 0, "correct": False, "category": "y",
                    "prediction": None, "error": "cannot read video"})
    records.append(rec(0, "none", 1.0, False))  # a duplicate line: the first one counts
    none, pruned = summary.summarize(records, items, cells)
    assert none["accuracy"] == 0.75 and none["relative_accuracy"] == 1.0 and none["categories"] == {"x": 1.0, "y": 0.5}
    assert pruned["accuracy"] == 0.25 and pruned["relative_accuracy"] == pytest.approx(1 / 3)
    assert pruned["errors"] == 1 and pruned["unparsed"] == 2 and pruned["questions"] == 4
    assert pruned["prefill_seconds"] == 0.25 and pruned["visual_tokens_kept"] == 50
    assert runner.plan_cells(["sharp", "none"], [0.1, 0.2]) == [("none", 1.0, 0), ("sharp", 0.1, 0), ("sharp", 0.2, 0)]
    assert runner.plan_cells(["sharp", "sharp"], [0.5, 0.50]) == [("sharp", 0.5, 0)]
    assert runner.plan_cells(["random", "none", "fastv"], [0.5], tie_seeds=2, random_seeds=3, first_seed=7) == [
        ("none", 1.0, 0), ("random", 0.5, 7), ("random", 0.5, 8), ("random", 0.5, 9), ("fastv", 0.5, 7),
        ("fastv", 0.5, 8)]


def test_half_written_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"item": "1", "method": "none", "ratio": 1.0, "seed": 0}\nnot json\n{"item": "2", "meth')
    assert [r["item"] for r in runner.read_results(path)] == ["1"]
    with jsonl.open_for_append(path) as handle:
        jsonl.append(handle, {"item": "3", "method": "none", "ratio": 1.0, "seed": 0})
    assert [r["item"] for r in runner.read_results(path)] == ["1", "3"] and path.read_text().endswith("\n")


# -- sharding --------------------------------------------------------------------------------------
def _job(tmp_path, world=2, rank=0):
    items = [formats.Item(f"q{i}", "/v.mp4", "q", ["a", "b"], "A") for i in range(3)]
    return runner.Job(items, [("none", 1.0, 0), ("sharp", 0.5, 0), ("sharp", 0.5, 1)], None, tmp_path / "r.jsonl",
                      {"s": 1}, {}, 8, rank, world)


def _write(path, job, item_ids, rank):
    with open(path, "a") as fh:
        for item in job.items:
            if item.id in item_ids:
                for method, ratio, seed in job.cells:
                    fh.write(json.dumps({"item": item.id, "method": method, "ratio": ratio, "seed": seed, "rank": rank,
                                         "settings": {"s": 1}}) + "\n")


def test_file_based_wait_and_merge_in_item_order(tmp_path):
    job = _job(tmp_path)
    assert [i.id for i in job.my_items] == ["q0", "q2"] and job.output.name == "r.jsonl.rank0"
    _write(runner.shard_path(job.results, 0), job, {"q0", "q2"}, 0)
    assert runner.wait_for_shards(job, timeout=0) == [1]  # rank 1 has written nothing yet
    _write(runner.shard_path(job.results, 1), job, {"q1"}, 1)
    assert runner.wait_for_shards(job, timeout=0) == []
    assert runner.merge(job) == 9
    assert [(r["item"], r["method"], r["seed"]) for r in read_jsonl(job.results)] == [
        (f"q{i}", m, s) for i in range(3) for m, s in (("none", 0), ("sharp", 0), ("sharp", 1))]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # shards removed once merged
    assert runner.merge(job) == 0 and len(read_jsonl(job.results)) == 9


def test_resume_reads_leftover_shards_and_refuses_other_settings(tmp_path):
    job = _job(tmp_path)
    _write(runner.shard_path(job.results, 1), job, {"q1"}, 1)
    single = _job(tmp_path, world=1)
    assert [(item.id, cells) for item, cells in runner.pending(single)] == [
        ("q0", single.cells[:2]), ("q2", single.cells[:2])]  # the first phase: every cell's first seed
    assert [(item.id, cells) for item, cells in runner.pending(single, later=True)] == [
        ("q0", single.cells[2:]), ("q2", single.cells[2:])]
    single.settings = {"s": 2}
    with pytest.raises(UsageError, match="other settings.*s: 1 there, 2 now"):
        runner.pending(single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_merge_to_the_single_process_result(model_dirs, synth_items, tmp_path):
    """Two real processes under a torchrun-style environment (gloo barrier) on the CPU."""
    import torch

    model = str(model_dirs["qwen2.5-vl"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SHARP_DEBUG="0", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "sharp_cli", "eval", str(synth_items), "-m", model, *SMALL,
           "-o", str(tmp_path / "sharded.jsonl"), "-q", "--shard-timeout", "120"]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (1, 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rank processes, so the arithmetic is the same
    try:
        single = sharp("eval", synth_items, "-m", model, *SMALL, "-o", tmp_path / "single.jsonl", "-q")
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.stderr
    for proc in ranks:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert _answers(tmp_path / "sharded.jsonl") == _answers(tmp_path / "single.jsonl")
    assert {r["rank"] for r in read_jsonl(tmp_path / "sharded.jsonl")} == {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.jsonl", "single.jsonl"]  # shards merged, removed

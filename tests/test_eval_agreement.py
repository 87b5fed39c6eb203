"""Agreement with the unpruned model (sharp_cli/evaluate/agreement.py): first-token KL and the
same answer, per cell and after resuming, with or without labelled answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SMALL, read_jsonl, sharp


# -- agreement with the unpruned model ---------------------------------------------------------------
def test_first_token_kl_and_same_answer():
    import math

    import torch

    from sharp_cli.evaluate import agreement

    ref = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    assert agreement.first_token(ref, ref.clone()) == {"first_token_kl": 0.0, "first_token_agree": True}
    got = agreement.first_token(ref, torch.tensor([math.log(0.25), math.log(0.75)]))
    assert got["first_token_kl"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert not got["first_token_agree"]
    options = ["red", "blue"]
    assert agreement.same_answer({"output": "B"}, {"output": "B. blue"}, options)
    assert agreement.same_answer({"prediction": "A", "output": "A"}, {"prediction": None, "output": "red"}, options)
    assert not agreement.same_answer({"prediction": "A", "output": "A"}, {"prediction": "B", "output": "B"}, options)
    assert agreement.same_answer({"output": "A Cat  sits"}, {"output": "a cat sits"}) and not agreement.same_answer(
        {"output": "a cat"}, {"output": "a dog"})


def test_agreement_of_a_model_with_itself_is_total(model_dirs, synth_items, tmp_path):
    """fastv and every-component-off sharp at ratio 1 run the unpruned computation: 100%, KL 0."""
    result = sharp("eval", synth_items, "-m", model_dirs["qwen2.5-vl"], *SMALL[:-2], "--ratio", 1, "--methods",
                   "none,fastv,sharp", "--no-segment-mask", "--debias", "none", "--no-dedup",
                   "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    none, *pruned = json.loads(result.stdout)["rows"]
    assert none["answer_agreement"] is None and none["agreement_questions"] == 0
    for row in pruned:
        assert (row["agreement_questions"], row["answer_agreement"], row["first_token_agreement"]) == (3, 1.0, 1.0)
        assert row["first_token_kl"] == 0.0
    assert "agree" in result.stderr and "KL" in result.stderr
    records = [r for r in read_jsonl(tmp_path / "r.jsonl") if r["method"] != "none"]
    assert len(records) == 6 and all(r["first_token_kl"] == 0.0 and r["first_token_agree"] for r in records)


def test_agreement_of_a_different_method_and_after_resuming(model_dirs, synth_items, tmp_path, monkeypatch):
    """Random pruning to 5% moves the first-token distribution; resuming a run that has only the
    unpruned answers redoes one unpruned prefill per item and stores the same figures as a fresh run."""
    from sharp_cli import answer

    model = model_dirs["qwen2.5-vl"]
    args = ("eval", synth_items, "-m", model, *SMALL[:-2], "--ratio", 0.05)
    fresh = sharp(*args, "--methods", "none,random", "-o", tmp_path / "fresh.jsonl", "--json")
    assert fresh.exit_code == 0, fresh.stderr
    row = json.loads(fresh.stdout)["rows"][1]
    assert row["first_token_kl"] > 1e-4 and row["agreement_questions"] == 3
    assert row["first_token_agreement"] < 1.0 or row["answer_agreement"] < 1.0
    calls = []
    real_ask = answer.ask
    monkeypatch.setattr(answer, "ask", lambda *a, **k: calls.append((a[3].method, k["max_new_tokens"]))
                        or real_ask(*a, **k))
    out = tmp_path / "resumed.jsonl"
    assert sharp(*args, "--methods", "none", "-o", out, "-q").exit_code == 0
    resumed = sharp(*args, "--methods", "none,random", "-o", out, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert calls[3:] == [("none", 1), ("random", 8)] * 3
    kl = lambda path: [(r["item"], round(r["first_token_kl"], 9), r["first_token_agree"])  # noqa: E731
                       for r in read_jsonl(path) if r["method"] == "random"]
    assert kl(out) == kl(tmp_path / "fresh.jsonl")
    assert json.loads(resumed.stdout)["rows"][1] | {"prefill_seconds": 0} == row | {"prefill_seconds": 0}


def test_agreement_counts_questions_without_answers(model_dirs, synth_items, tmp_path):
    records = [json.loads(line) for line in Path(synth_items).read_text().splitlines()]
    videos = Path(synth_items).parent
    bare = [{"video": str(videos / r["video"]), "question": r["question"]} for r in records]
    (tmp_path / "open.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    result = sharp("eval", tmp_path / "open.jsonl", "-m", model_dirs["qwen2.5-vl"], *SMALL, "--methods", "none,sharp",
                   "-o", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    none, pruned = json.loads(result.stdout)["rows"]
    assert none["accuracy"] is None and none["questions"] == 3 and pruned["agreement_questions"] == 3
    assert pruned["unparsed"] == 0 and 0.0 <= pruned["answer_agreement"] <= 1.0

"""Accuracy on bare questions, the way `sharp ask` is asked: the first N items of a `sharp synth` set
without their options, answered by one `sharp batch` run, scored by the answer word (docs/eval.md,
"Bare questions"). `sharp eval` measures the multiple-choice prompt instead.

    sharp synth /tmp/heldout --n 400 --seed 0 -q
    python -m research.bare_accuracy /tmp/heldout/items.jsonl --items 120 -- -m sharp-tiny --layer 6

Everything after `--` goes to `sharp batch` (model, method, ratio, layer, ShaRP's switches).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("items", type=Path, help="items.jsonl written by `sharp synth`")
    ap.add_argument("--items", dest="count", type=int, default=120)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    args.batch_args = argv[split + 1:]
    rows = [json.loads(line) for line in args.items.read_text().splitlines()][: args.count]
    truth = {row["id"]: (row["options"]["ABCD".index(row["answer"])], row["category"]) for row in rows}
    with tempfile.TemporaryDirectory() as work:
        questions = Path(work) / "questions.jsonl"
        questions.write_text("".join(json.dumps({"video": str(args.items.parent / row["video"]), "question": row["question"],
                                                 "id": row["id"], "max_tokens": 4}) + "\n" for row in rows))
        run = subprocess.run([sys.executable, "-m", "sharp_cli", "batch", str(questions), *args.batch_args],
                             capture_output=True, text=True)
    if not run.stdout.strip():  # the batch never started (bad options, no model): say why
        print(f"sharp batch answered nothing (exit {run.returncode}): {run.stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
    right = collections.defaultdict(lambda: [0, 0])
    for line in run.stdout.splitlines():
        answer = json.loads(line)
        word, task = truth[answer["id"]]
        correct = not answer.get("error") and answer["answer"].strip().lower() == word.lower()
        for key in (task, "all"):
            right[key][0] += correct
            right[key][1] += 1
    print(" ".join(args.batch_args), "|", "  ".join(f"{k} {r}/{n} ({r / n:.1%})" for k, (r, n) in right.items()))
    return 0 if run.returncode in (0, 1) else run.returncode


if __name__ == "__main__":
    sys.exit(main())

"""How far any selection at layer K could go on sharp-tiny: the held-out multiple-choice items answered
with kept sets chosen from the answer's own pixels, beside the methods. If even keeping every token
that shows the needle does not bring the accuracy to the unpruned one, the limit at that K and ratio
is the model running on few tokens, not the choice of tokens (docs/eval.md, "Pruning on sharp-tiny").

    python -m research.oracle_keep [--items 200] [--layer 2] [--ratio 0.15]

Kept sets, each exactly round(r * N) tokens unless noted:
  needles + fastv    every needle token, the rest from fastv's own kept set
  needles + random   every needle token, the rest a seeded random draw
  needles only       the needle tokens alone (fewer than round(r * N))
  no needles         fastv's kept set with every needle token swapped for a non-needle one
A needle token is one whose pixels differ from the first frame's (research/dropped_tokens.py). Items
whose needle tokens outnumber round(r * N) keep the first round(r * N) of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from research.dropped_tokens import held_out, needle_tokens
from sharp_cli import answer, video
from sharp_cli.evaluate import synth
from sharp_cli.letters import build_prompt, parse_letter
from sharp_cli.prune import PruneConfig, keep_count
from sharp_cli.prune.prior import PriorStore

SETS = ["needles + fastv", "needles + random", "needles only", "no needles"]


def forced_answer(loaded, clip, prompt, cfg, keep: np.ndarray) -> str:
    """The answer with exactly these visual tokens kept from layer K on (causal mask, no prior)."""
    forced = torch.as_tensor(np.sort(keep), dtype=torch.long)
    out = answer.run(loaded, clip, prompt, cfg, 8, forced_keep=forced)
    return loaded.processor.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()


def kept_sets(needles: np.ndarray, fastv_kept: np.ndarray, n: int, k: int, rng) -> dict[str, np.ndarray]:
    needles = needles[:k]
    others = np.setdiff1d(np.arange(n), needles)
    fastv_rest = np.setdiff1d(fastv_kept, needles)
    fill = k - needles.size
    return {
        "needles + fastv": np.concatenate([needles, rng.permutation(fastv_rest)[:fill]]),
        "needles + random": np.concatenate([needles, rng.choice(others, fill, replace=False)]),
        "needles only": needles if needles.size else fastv_kept[:1],
        "no needles": np.concatenate([np.setdiff1d(fastv_kept, needles),
                                      rng.choice(np.setdiff1d(others, fastv_kept),
                                                 np.isin(fastv_kept, needles).sum(), replace=False)]),
    }


def main():
    args, loaded, work, items = held_out("sharp-oracle-")
    store, rng = PriorStore(use_disk=False), np.random.default_rng(0)
    # causal mask, no prior
    forced_cfg = loaded.resolve_prune(PruneConfig(method="fastv", ratio=args.ratio, layer=args.layer))
    rows = []
    for item in items:
        clip = video.load_video(work / item["video"], frames=32)
        prompt = build_prompt(item["question"], item["options"])
        right = lambda text: parse_letter(text, item["options"]) == item["answer"]  # noqa: E731
        row = {"id": item["id"], "task": item["category"]}
        for method in ("none", "fastv", "sharp"):
            cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=args.ratio if method != "none" else 1.0,
                                                   layer=args.layer))
            got = answer.ask(loaded, clip, prompt, cfg, max_new_tokens=8, store=store)
            row[method] = right(got.text)
            if method == "fastv":
                fastv_kept = got.prefill.kept.numpy()
                layout = got.encoded.layout
        n, k = layout.num_visual, keep_count(args.ratio, layout.num_visual)
        needles = needle_tokens(clip.frames, layout.grid)
        row["needle_tokens"] = int(needles.size)
        for name, keep in kept_sets(needles, fastv_kept, n, k, rng).items():
            row[name] = right(forced_answer(loaded, clip, prompt, forced_cfg, keep))
        rows.append(row)
    print(f"{args.model}, {len(rows)} held-out items (seed 0), K={args.layer}, r={args.ratio} "
          f"({keep_count(args.ratio, n)} of {n} tokens); needle tokens per item: median "
          f"{int(np.median([r['needle_tokens'] for r in rows]))}, more than the budget in "
          f"{sum(r['needle_tokens'] > k for r in rows)}")
    tasks = ["all", *synth.BASIC]
    print(f"{'kept set':18s} " + " ".join(f"{t:>9s}" for t in tasks))
    for name in ["none", "fastv", "sharp", *SETS]:
        cells = [np.mean([r[name] for r in rows if t in ("all", r["task"])]) for t in tasks]
        print(f"{name:18s} " + " ".join(f"{c:9.1%}" for c in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Does layer K's question attention find the tokens that show the answer, on sharp-small? Per task of
the dev set (seed 999: never trained on, the set choices are read on; docs/eval.md), for FastV at K:
the share of the visual tokens' attention on the needle tokens (the tokens the item's needle_boxes
overlap) against their share of the tokens, and the needle recall of FastV's kept set at --ratio.
Attention no better than the needles' share of the tokens is query-blind ranking: then what FastV
keeps at r=0.5 is about half of the needle, whatever the question.

    python -m research.small_needle_attention -m research/checkpoints/q2 [--items 40] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from sharp_cli import answer, loading, video
from sharp_cli.evaluate import needles, synth
from sharp_cli.letters import build_prompt
from sharp_cli.prune import PruneConfig
from sharp_cli.prune import session as pruning
from sharp_cli.prune.prior import PriorStore


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=999, help="synth seed of the set (999: the dev set)")
    args = ap.parse_args()
    seen = {}
    select = pruning.select_fastv

    def watch(scores, ratio, seed):  # FastV's own ranking input and its kept set
        kept, details = select(scores, ratio, seed)
        seen.update(scores=scores.detach().float().cpu(), kept=kept.detach().cpu())
        return kept, details

    pruning.select_fastv = watch
    loaded = loading.load(args.model, device="cpu", quant="none", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="sharp-needle-attention-"))
    items_file = synth.write(work, args.items, seed=args.seed, frames=64, size=168, tasks=("all",))
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    store = PriorStore(use_disk=False)
    by_task = defaultdict(lambda: defaultdict(list))
    for item in items:
        clip = video.load_video(work / item["video"], frames=64)
        cfg = loaded.resolve_prune(PruneConfig(method="fastv", ratio=args.ratio, layer=args.layer))
        got = answer.ask(loaded, clip, build_prompt(item["question"], item["options"]), cfg, max_new_tokens=1,
                         store=store)
        layout = got.encoded.layout
        needle = needles.token_numbers(item["needle_boxes"], (168, 168), list(clip.indices), layout.grid,
                                       layout.frames_per_step)
        if not needle:
            continue
        scores = seen["scores"].reshape(-1)
        scores = scores / scores.sum()
        row = by_task[item["category"]]
        row["attention"].append(scores[needle].sum().item())
        row["tokens"].append(len(needle) / scores.numel())
        row["recall"].append(needles.recall(needle, seen["kept"].tolist()))
    print(f"{args.model}: FastV K={args.layer} r={args.ratio}, {len(items)} dev items (seed {args.seed}), medians")
    print(f"{'task':<10} {'items':>5} {'attention on needle':>20} {'needle share of tokens':>23} "
          f"{'recall of kept':>15}")
    for task in sorted(by_task):
        row = by_task[task]
        print(f"{task:<10} {len(row['recall']):>5} {np.median(row['attention']):>20.3f} "
              f"{np.median(row['tokens']):>23.3f} {np.median(row['recall']):>15.3f}")


if __name__ == "__main__":
    main()

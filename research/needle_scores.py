"""Where layer K's question attention and sharp's positional prior fall on sharp-tiny's held-out items,
against the tokens that show the needle (research/history.md, "Subtracting the prior").

    python -m research.needle_scores [-m sharp-tiny] [--items 40] [--layer 2]

Prints the share of the visual tokens' attention mass on the needle tokens (and the needles' share
of the tokens; how much of it the top needle token has), the prior's share on the same tokens, how many needle tokens score below zero once
the prior is subtracted, and the prior's mass per token frame.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from research.dropped_tokens import needle_tokens
from sharp_cli import answer, loading, video
from sharp_cli.evaluate import synth
from sharp_cli.letters import build_prompt
from sharp_cli.prune import PruneConfig
from sharp_cli.prune import session as pruning
from sharp_cli.prune.prior import PriorStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="sharp-tiny")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--layer", type=int, default=2)
    args = ap.parse_args()
    seen = {}
    select = pruning.select_sharp

    def watch(log_attention, prior, hidden_visual, layout, cfg):  # what sharp ranks with, before it ranks
        seen.update(scores=log_attention.exp().mean(dim=(0, 1)).detach().float().cpu(),
                    prior=prior.mean(0).detach().float().cpu())  # heads and rows averaged
        return select(log_attention, prior, hidden_visual, layout, cfg)

    pruning.select_sharp = watch
    loaded = loading.load(args.model, device="cpu", quant="none", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="sharp-needles-"))
    items = [json.loads(line) for line in synth.write(work, args.items, seed=0).read_text().splitlines()]
    store = PriorStore(use_disk=False)
    on_needles, prior_on_needles, needle_share, top, below, needles_total = [], [], [], [], 0, 0
    for item in items:
        clip = video.load_video(work / item["video"], frames=32)
        cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.15, layer=args.layer))
        got = answer.ask(loaded, clip, build_prompt(item["question"], item["options"]), cfg, max_new_tokens=1,
                         store=store)
        grid = got.encoded.layout.grid
        needles = needle_tokens(clip.frames, grid)
        scores = seen["scores"] / seen["scores"].sum()
        prior = seen["prior"] / seen["prior"].sum()
        on_needles.append(scores[needles].sum().item())
        top.append((scores[needles].max() / scores[needles].sum()).item())
        prior_on_needles.append(prior[needles].sum().item())
        needle_share.append(len(needles) / scores.numel())
        below += int(((scores - prior)[needles] < 0).sum())
        needles_total += len(needles)
    t, h, w = grid
    print(f"{args.model}, K={args.layer}, {len(items)} held-out items (seed 0)")
    print(f"attention share on needle tokens: median {np.median(on_needles):.3f} (their share of the tokens: "
          f"median {np.median(needle_share):.3f}); the prior's share on them: median {np.median(prior_on_needles):.3f}")
    print(f"the top needle token's share of that: median {np.median(top):.3f}; needle tokens below zero once the "
          f"prior is subtracted: {below} of {needles_total}")
    print("prior mass per token frame:", " ".join(f"{x:.3f}" for x in prior.view(t, h * w).sum(-1).tolist()))


if __name__ == "__main__":
    main()

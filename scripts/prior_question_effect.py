"""What the positional prior's fixed question costs: the prior from the fixed question against the
prior from the user's own question, on the same black clip.

    python scripts/prior_question_effect.py [--families qwen2.5-vl,llava-onevision] [--seeds 0,1]

sharp computes the prior once per layout with "What happens in this video?" so that one cached
prior serves every question. The user's question has other tokens and another length, so the
rows that score the video sit elsewhere. For each family, clip layout and question this prints
the Spearman rank correlation of the two priors (over the visual tokens), and how much of the
kept set (ratio 0.15, no dedup) stays the same when the real clip's scores are debiased with one
prior or the other. Tiny random models on the CPU (no trained weights here), so the numbers say
how the mechanism behaves, not what a trained checkpoint does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sharp_cli import engine, loading  # noqa: E402
from sharp_cli.models import adapter_for  # noqa: E402
from sharp_cli.models.random_init import build_random, tiny_config  # noqa: E402
from sharp_cli.prior_pass import PRIOR_QUESTION, _black_clip, _scores_only  # noqa: E402
from sharp_cli.prune import PruneConfig, keep_count  # noqa: E402
from sharp_cli.prune.sharp import debias  # noqa: E402
from sharp_cli.video import VideoClip  # noqa: E402

QUESTIONS = ["what colour is the ball?", "how many objects move left?",
             "is the red square above the blue circle in the last frame?",
             "describe what happens in this video, frame by frame, and which object moves first?"]
LAYOUTS = [(8, 56, 56), (4, 84, 112), (16, 56, 56)]  # frames, height, width
MAX_PIXELS = 56 * 56 * 4


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def clip_of(frames: int, height: int, width: int, seed: int) -> VideoClip:
    import numpy as np

    content = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return VideoClip(content, 4.0, frames, list(range(frames)), "memory", "<memory>")


def scores(loaded, clip, question: str, cfg) -> tuple[torch.Tensor, object]:
    encoded, _ = engine.encode(loaded, engine.prepare(loaded, clip, question, MAX_PIXELS))
    return _scores_only(loaded, encoded, cfg), encoded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="qwen2.5-vl,qwen2-vl,qwen3-vl,llava-onevision")
    p.add_argument("--seeds", default="0,1", help="model seeds (each a different random model)")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| family | --query | cases | Spearman mean | Spearman min | kept set shared, mean | min |")
    print("|---|---|---|---|---|---|---|")
    for family in a.families.split(","):
        for query in ("last", "text"):
            rhos, shared = [], []
            for seed in (int(s) for s in a.seeds.split(",")):
                config = tiny_config(family)
                model, processor = build_random(config, dtype="float32", seed=seed)
                loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), f"tiny-{family}",
                                                      torch.device("cpu"), torch.float32, "none", True))
                cfg = loaded.adapter.validate_prune(PruneConfig(query=query), loaded.num_layers)
                for layout_no, (frames, height, width) in enumerate(LAYOUTS):
                    clip = clip_of(frames, height, width, seed=100 * seed + layout_no)
                    black = _black_clip(clip)
                    fixed, _ = scores(loaded, black, PRIOR_QUESTION, cfg)
                    for question in QUESTIONS:
                        own, _ = scores(loaded, black, question, cfg)
                        real, encoded = scores(loaded, clip, question, cfg)
                        rhos.append(spearman(fixed, own))
                        k = keep_count(0.15, encoded.layout.num_visual)
                        keep_fixed = set(debias(real, fixed, "subtract").topk(k).indices.tolist())
                        keep_own = set(debias(real, own, "subtract").topk(k).indices.tolist())
                        shared.append(len(keep_fixed & keep_own) / k)
            print(f"| {family} | {query} | {len(rhos)} | {sum(rhos) / len(rhos):.3f} | {min(rhos):.3f} | "
                  f"{sum(shared) / len(shared):.1%} | {min(shared):.1%} |", flush=True)


if __name__ == "__main__":
    main()

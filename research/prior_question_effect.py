"""What the positional prior's fixed question costs: the prior from the fixed question against the
prior from the user's own question, on the same black clip.

    python -m research.prior_question_effect [--families qwen2.5-vl,llava-onevision] [--seeds 0,1]
    python -m research.prior_question_effect --model Qwen/Qwen2.5-VL-7B-Instruct --video clip.mp4  # GPU

sharp computes the prior once per layout with "What happens in this video?" so that one cached
prior serves every question. The user's question has other tokens and another length, so the
rows that score the video sit elsewhere. For each family, clip layout and question this prints
the Spearman rank correlation of the two priors (over the visual tokens), how uneven the prior is
(std/mean of the normalised prior), how far the question moves it against how far it is from
flat (L1 of the difference over L1 from uniform), and how much of the kept set (ratio 0.15, no
dedup) stays the same when the real clip's scores are debiased (the default, dividing) with one prior or
the other. By default tiny random models on the CPU (no trained weights here), so the
numbers say how the mechanism behaves, not what a trained checkpoint does; --model measures a
real one (with --video, on that video's frames at 8, 16 and 32 frames, instead of noise clips).
"""

from __future__ import annotations

import argparse

import torch

from sharp_cli import engine, loading
from sharp_cli.models import adapter_for
from sharp_cli.models.random_init import build_random, tiny_config
from sharp_cli.prior_pass import PRIOR_QUESTION, black_clip
from sharp_cli.prune import PruneConfig, keep_count, rank
from sharp_cli.prune.session import PruneSession, StopPrefill
from sharp_cli.prune.sharp import debias, prior_from
from sharp_cli.video import VideoClip

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


@torch.inference_mode()
def scores(loaded, clip, question: str, cfg, max_pixels=MAX_PIXELS) -> tuple[torch.Tensor, object]:
    """(layer K's log attention (H, R, N) from cfg's query rows, the encoded prompt)."""
    encoded, _ = engine.encode(loaded, engine.prepare(loaded, clip, question, max_pixels))
    session = PruneSession(loaded.adapter, loaded.model, encoded, cfg, score_only=True)
    try:
        with session:
            loaded.adapter.text_model(loaded.model)(inputs_embeds=encoded.inputs_embeds,
                                                    position_ids=encoded.position_ids, use_cache=False, **encoded.extra)
    except StopPrefill:
        pass
    return session.log_attention, encoded


def load(family: str, seed: int | None):
    if seed is None:  # a real checkpoint
        return loading.load(family, quant="none")
    config = tiny_config(family)
    model, processor = build_random(config, dtype="float32", seed=seed)
    return loading.ready(loading.Loaded(model, processor, adapter_for(config), f"tiny-{family}",
                                        torch.device("cpu"), torch.float32, "none", True))


def clips(args, seed: int):
    if args.video:
        from sharp_cli.video import load_video

        return [load_video(args.video, frames=n) for n in (8, 16, 32)]
    return [clip_of(frames, height, width, seed=100 * seed + i) for i, (frames, height, width) in enumerate(LAYOUTS)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="qwen2.5-vl,qwen2-vl,qwen3-vl,llava-onevision")
    p.add_argument("--seeds", default="0,1", help="model seeds (each a different random model)")
    p.add_argument("--model", help="a real checkpoint (hub id or folder) instead of the tiny random models")
    p.add_argument("--video", help="with --model: sample this video instead of noise clips")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| family | --query | cases | Spearman mean | Spearman min | prior spread (std/mean) | "
          "change / structure | kept set shared, mean | min |")
    print("|---|---|---|---|---|---|---|---|---|")
    pixels = None if a.model else MAX_PIXELS  # real models: their family's budget
    models = [(a.model, None)] if a.model else [(f, int(s)) for f in a.families.split(",") for s in a.seeds.split(",")]
    for family in dict.fromkeys(m for m, _ in models):
        for query in ("last", "text"):
            rhos, shared, spread, change = [], [], [], []
            for seed in (s for m, s in models if m == family):
                loaded = load(family, seed)
                cfg = loaded.resolve_prune(PruneConfig(query=query))
                for layout_no, clip in enumerate(clips(a, seed or 0)):
                    black = black_clip(clip)
                    fixed = prior_from(scores(loaded, black, PRIOR_QUESTION, cfg, pixels)[0])  # (H, N)
                    for question in QUESTIONS:
                        own = prior_from(scores(loaded, black, question, cfg, pixels)[0])
                        real, encoded = scores(loaded, clip, question, cfg, pixels)
                        pf, po = fixed.mean(0), own.mean(0)  # the heads' priors averaged, for one number
                        rhos.append(spearman(pf, po))
                        spread.append(float(pf.std() / pf.mean()))
                        # how far the question moves the prior, against how far the prior is from flat
                        change.append(float((pf - po).abs().sum() / (pf - 1 / len(pf)).abs().sum()))
                        k = keep_count(0.15, encoded.layout.num_visual)
                        keep_fixed = set(rank.top(debias(real, fixed, cfg), k, cfg.seed)[0].tolist())
                        keep_own = set(rank.top(debias(real, own, cfg), k, cfg.seed)[0].tolist())
                        shared.append(len(keep_fixed & keep_own) / k)
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            print(f"| {family} | {query} | {len(rhos)} | {mean(rhos):.3f} | {min(rhos):.3f} | {mean(spread):.4f} | "
                  f"{mean(change):.2f} | {mean(shared):.1%} | {min(shared):.1%} |", flush=True)


if __name__ == "__main__":
    main()

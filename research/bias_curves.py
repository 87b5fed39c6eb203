"""How well each debiasing rule removes a known content-free bias, and what --register-ratio sees.

1. Real layer-K attention. On the first --items clips of `sharp synth --seed 0` (the multiple-choice
   prompt `sharp eval` asks), sharp-tiny's layer-K attention from the query rows is read per head
   and row (sharp's default path: segment mask in layers 0..K-1), and the black-video prior comes
   from the real prior pass. A bias of growing gain g is then added to every head's logits over the
   visual tokens, exactly (no model rerun; the black video gets the same bias):

       b[h, n] = g * (slope[h] * frame(n) / (T - 1) + sink[h] * [frame(n) == T - 1])

   a per-head recency slope and an end-frame sink. For each rule and g:
       spearman  rank correlation of the rule's scores with its own scores at g = 0 (1: the injected
                 bias left no trace; ties get average ranks)
       recall    share of the needle tokens (the drawn boxes that show the answer, mapped onto the
                 token grid) among the rule's round(ratio * N) best, ties broken by sharp's seeded
                 permutation
   averaged over the clips.
2. Synthetic attention (no model): 4 heads that see the content differently, 6 needles, the same
   kind of bias, with and without a 1% attention leak the black video does not show; spearman
   against the content's own (unbiased) scores, recall at k = 12.
3. Hidden-state norms at layer K over the median visual token's (what --register-ratio compares):
   sharp-tiny on the same clips, and a random-weights Qwen2.5-VL-3B (its shipped config, text model
   cut to K + 1 layers) on the first 2 of them; with --norms-model, a real checkpoint on all of them.

    python -m research.bias_curves [--items 8] [--layer 2] [--ratio 0.15] [--out bias_curves.json]
    python -m research.bias_curves --no-random-qwen --norms-model Qwen/Qwen2.5-VL-7B-Instruct  # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sharp_cli import engine, loading, video
from sharp_cli.evaluate import synth
from sharp_cli.letters import build_prompt
from sharp_cli.models import adapter_for
from sharp_cli.models.random_init import build_random, load_config
from sharp_cli.prior_pass import positional_prior, score_pass
from sharp_cli.prune import PruneConfig, keep_count, rank
from sharp_cli.prune.prior import PriorStore
from sharp_cli.prune.sharp import calibrate, debias, head_mean, prior_from

SLOPES = (1.5, -1.0, 2.5, 0.5)  # per head, cycled: logits gained from the first token frame to the last
SINKS = (2.0, 0.5, 3.0, 0.0)  # per head, cycled: extra logit of the last token frame
RULES = {  # name -> PruneConfig changes ("uniform": see scores_for)
    "divide (default)": {},
    "divide, heads weighted equally": {"uniform": True},
    "divide, strength 0 (no prior)": {"debias_strength": 0.0},
    "divide, floor 0.001": {"debias_floor": 0.001},
    "divide, floor 1": {"debias_floor": 1.0},
    "divide-mean": {"debias": "divide-mean"},
    "divide-mean, floor 0.001 (the old rule)": {"debias": "divide-mean", "debias_floor": 0.001},
    "subtract": {"debias": "subtract"},
    "none": {"debias": "none"},
}
NORM_RATIOS = (1.5, 2.0, 5.0, 10.0)


def bias(heads: int, grid, gain: float) -> torch.Tensor:
    """(H, N) content-free logits: a recency slope and an end-frame sink per head."""
    t, h, w = grid
    frame = torch.arange(t).repeat_interleave(h * w).float()
    slope = torch.tensor([SLOPES[i % len(SLOPES)] for i in range(heads)]).view(-1, 1)
    sink = torch.tensor([SINKS[i % len(SINKS)] for i in range(heads)]).view(-1, 1)
    return gain * (slope * frame / max(1, t - 1) + sink * (frame == t - 1).float())


def inject(log_attention: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Log attention (H, R, N) after adding b (H, N) to the logits of the visual keys: each row's
    text keys keep their logits, so the row is renormalised over text and video together."""
    mass = log_attention.exp().sum(-1, keepdim=True).clamp(max=1.0)  # the row's share on the video
    shifted = log_attention + b.unsqueeze(1)
    norm = torch.logaddexp(torch.log1p(-mass + 1e-12), torch.logsumexp(shifted, -1, keepdim=True))
    return shifted - norm


def inject_prior(prior: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The prior (H, N) of a black video whose logits gained b: rows average in log space and each
    head is renormalised over the visual tokens, so the text keys' share cancels."""
    return (prior.clamp_min(1e-30).log() + b).softmax(-1)


def scores_for(log_attention, prior, cfg, uniform: bool = False) -> torch.Tensor:
    """The rule's (N,) ranking scores; uniform: divide per head, but every head and row averaged
    with the same weight instead of by its attention mass on the video."""
    if not uniform:
        return debias(log_attention, prior, cfg)
    calibrated = calibrate(log_attention, prior, cfg.debias_strength, cfg.debias_floor).flatten(0, 1)
    return torch.logsumexp(calibrated, dim=0) - math.log(calibrated.shape[0])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else 1.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end - 1) / 2
            start = end
    return ranks


def recall(scores: torch.Tensor, needles: np.ndarray, k: int, seed: int = 0) -> float:
    top = rank.rank(scores, seed)[:k].numpy()
    return float(np.isin(needles, top).mean()) if needles.size else 1.0


def needle_tokens(item: dict, clip, grid) -> np.ndarray:
    """Visual token numbers that overlap a drawn needle box: box frame -> sampled frame -> token
    frame; pixels scaled from the clip's frame size to the token grid."""
    t, h, w = grid
    height, width = clip.frames.shape[1:3]
    per_step = max(1, len(clip.frames) // t)
    sampled = {source: i for i, source in enumerate(clip.indices)}
    hits = set()
    for frame, x0, y0, x1, y1 in item["needle_boxes"]:
        if frame not in sampled:
            continue
        ti = min(t - 1, sampled[frame] // per_step)
        rows = range(int(y0 * h / height), min(h, math.ceil(y1 * h / height)))
        cols = range(int(x0 * w / width), min(w, math.ceil(x1 * w / width)))
        hits.update((ti * h + r) * w + c for r in rows for c in cols)
    return np.array(sorted(hits), dtype=np.int64)


def norm_ratios(hidden_visual: torch.Tensor) -> np.ndarray:
    norms = hidden_visual.float().norm(dim=-1)
    return (norms / norms.median()).numpy()


def real_curves(loaded, work, items, args, gains):
    """Part 1 (and sharp-tiny's norms for part 3)."""
    store = PriorStore(use_disk=False)
    base = loaded.resolve_prune(PruneConfig(layer=args.layer, ratio=args.ratio))
    results = {rule: {g: {"spearman": [], "recall": []} for g in gains} for rule in RULES}
    ratios, setting = [], {}
    for item in items:
        clip = video.load_video(work / item["video"], frames=32)
        inputs = engine.prepare(loaded, clip, build_prompt(item["question"], item["options"]))
        encoded, _ = engine.encode(loaded, inputs)
        layout = encoded.layout
        session = score_pass(loaded, encoded, base)
        log_attention = session.log_attention
        ratios.append(norm_ratios(session.visual_hidden))
        prior = positional_prior(loaded, clip, encoded, base, store).prior
        needles = needle_tokens(item, clip, layout.grid)
        k = keep_count(args.ratio, layout.num_visual)
        setting = dict(k=k, n=layout.num_visual, heads=log_attention.shape[0], layer=base.layer,
                       floor=base.debias_floor)
        for rule, changes in RULES.items():
            changes = dict(changes)
            uniform = changes.pop("uniform", False)
            cfg = replace(base, **changes)
            unbiased = None
            for g in gains:
                b = bias(log_attention.shape[0], layout.grid, g)
                scores = scores_for(inject(log_attention, b), inject_prior(prior, b), cfg, uniform)
                values = scores.double().numpy()
                unbiased = values if unbiased is None else unbiased
                results[rule][g]["spearman"].append(spearman(values, unbiased))
                results[rule][g]["recall"].append(recall(scores, needles, k, base.seed))
    return _means(results), np.concatenate(ratios), setting


def synthetic_curves(gains, leak: float):
    """Part 2: heads = 4, rows = 2, 8 token frames of 16, 16 text keys; the content's own scores
    are the reference."""
    heads, rows, t, c, text_keys = 4, 2, 8, 16, 16
    n = t * c
    gen = torch.Generator().manual_seed(0)
    needles = torch.randperm(n, generator=gen)[:6]
    shared = torch.randn(n, generator=gen) * 0.7
    shared[needles] += 4.0
    content = shared + torch.randn(heads, 1, n, generator=gen) + 0.2 * torch.randn(heads, rows, n, generator=gen)
    text = torch.randn(heads, rows, text_keys, generator=gen) + 2.0

    def attention(content, b, leak):
        logits = torch.cat([text, content + b.unsqueeze(1)], dim=-1)
        if not leak:
            return logits.log_softmax(-1)[..., text_keys:]
        return ((1 - leak) * logits.softmax(-1) + leak / logits.shape[-1]).log()[..., text_keys:]

    reference = head_mean(attention(content, torch.zeros(heads, n), leak)).double().numpy()
    results = {rule: {} for rule in RULES}
    for g in gains:
        b = bias(heads, (t, 4, 4), g)
        scores = attention(content, b, leak)
        prior = prior_from(attention(torch.zeros(heads, rows, n), b, 0.0))
        for rule, changes in RULES.items():
            changes = dict(changes)
            uniform = changes.pop("uniform", False)
            ranked = scores_for(scores, prior, replace(PruneConfig(), **changes), uniform)
            results[rule][g] = {"spearman": spearman(ranked.double().numpy(), reference),
                                "recall": recall(ranked, needles.numpy(), 12)}
    return {rule: {str(g): cell for g, cell in by_gain.items()} for rule, by_gain in results.items()}


def random_qwen_ratios(work, items, layer: int) -> np.ndarray:
    """Part 3: norms at layer K of a random-weights Qwen2.5-VL-3B (text model cut to K + 1 layers)."""
    config = load_config("Qwen/Qwen2.5-VL-3B-Instruct")
    config.text_config.num_hidden_layers = layer + 1
    model, processor = build_random(config, dtype="float32")
    loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), "random Qwen2.5-VL-3B",
                                          torch.device("cpu"), torch.float32, "none", True))
    return layer_ratios(loaded, work, items, layer, frames=8)


def checkpoint_ratios(name: str, work, items, layer: int) -> np.ndarray:
    """Part 3 on a real checkpoint (--norms-model; a GPU for a 7B model): norms at layer K."""
    return layer_ratios(loading.load(name), work, items, layer, frames=32)


def layer_ratios(loaded, work, items, layer: int, frames: int) -> np.ndarray:
    """The visual tokens' norm ratios at layer K's input over every item, concatenated."""
    cfg = loaded.resolve_prune(PruneConfig(layer=layer))
    ratios = []
    for item in items:
        clip = video.load_video(work / item["video"], frames=frames)
        inputs = engine.prepare(loaded, clip, build_prompt(item["question"], item["options"]))
        encoded, _ = engine.encode(loaded, inputs)
        ratios.append(norm_ratios(score_pass(loaded, encoded, cfg).visual_hidden.cpu()))
    return np.concatenate(ratios)


def _means(results):
    return {rule: {str(g): {m: float(np.mean(v)) for m, v in cell.items()} for g, cell in by_gain.items()}
            for rule, by_gain in results.items()}


def _print_table(title, table, gains):
    print(f"\n{title}\ncells: spearman / recall")
    print("| rule | " + " | ".join(f"g={g:g}" for g in gains) + " |")
    print("|---|" + "---|" * len(gains))
    for rule, by_gain in table.items():
        print(f"| {rule} | " + " | ".join(f"{c['spearman']:.3f} / {c['recall']:.2f}" for c in by_gain.values()) + " |")


def _norm_summary(ratios: np.ndarray) -> dict:
    return {"tokens": int(ratios.size), "max": float(ratios.max()),
            **{f"above {r:g}x": int((ratios > r).sum()) for r in NORM_RATIOS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--gains", default="0,1,2,4,8,16")
    ap.add_argument("--no-random-qwen", action="store_true", help="skip part 3's random Qwen2.5-VL-3B")
    ap.add_argument("--norms-model", help="part 3 also on this checkpoint (hub id or folder; a GPU for 7B)")
    ap.add_argument("--out", default="bias_curves.json")
    args = ap.parse_args()
    gains = [float(g) for g in args.gains.split(",")]
    started = time.perf_counter()
    loaded = loading.load("sharp-tiny", device="cpu", quant="none", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="sharp-bias-"))
    items = [json.loads(line) for line in synth.write(work, args.items, seed=0).read_text().splitlines()]
    real, tiny_ratios, setting = real_curves(loaded, work, items, args, gains)
    print(f"sharp-tiny, K={setting['layer']}, r={args.ratio} (k = {setting['k']} of {setting['n']}), {len(items)} "
          f"clips of `sharp synth --seed 0`, {setting['heads']} heads; slopes {SLOPES}, sinks {SINKS} (logits x g, "
          f"heads cycle through them); default floor {setting['floor']}")
    _print_table("1. sharp-tiny's real layer-K attention + injected bias (spearman with the rule at g=0; "
                 "needle recall@k)", real, gains)
    synthetic = {}
    for leak in (0.0, 0.01):
        synthetic[str(leak)] = synthetic_curves(gains, leak)
        _print_table(f"2. synthetic, {leak:.0%} leak (spearman with the content's scores; needle recall@12)",
                     synthetic[str(leak)], gains)
    norms = {"sharp-tiny": _norm_summary(tiny_ratios)}
    if not args.no_random_qwen:
        norms["random Qwen2.5-VL-3B"] = _norm_summary(random_qwen_ratios(work, items[:2], args.layer))
    if args.norms_model:
        norms[args.norms_model] = _norm_summary(checkpoint_ratios(args.norms_model, work, items, args.layer))
    print("\n3. layer-K hidden-state norm / median visual token's norm")
    for name, summary in norms.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
    Path(args.out).write_text(json.dumps({"layer": args.layer, "ratio": args.ratio, "items": len(items),
                                          "slopes": SLOPES, "sinks": SINKS, "setting": setting, "real": real,
                                          "synthetic": synthetic, "norms": norms}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

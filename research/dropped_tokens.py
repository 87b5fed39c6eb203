"""Which visual tokens a pruning method keeps on sharp-tiny's held-out items, and whether the answer
follows: for every item, the tokens that show the needle (the pixels that differ from the first
frame, mapped onto the token grid) and how many of them each method kept, against whether its
first answer token was right.

    python -m research.dropped_tokens [-m sharp-tiny] [--items 200] [--layer 2] [--ratio 0.15] [--out result.json]

Prints, per method and task: accuracy, the share of needle tokens kept, accuracy on the items
where at least one needle token was kept and on those where none was, the share of answers that are
none of the options, and the median number of token frames the kept tokens come from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from sharp_cli import answer, loading, video
from sharp_cli.evaluate import synth
from sharp_cli.letters import build_prompt, parse_letter
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore

METHODS = {"sharp": {}, "sharp, no segment mask": {"segment_mask": False}, "sharp, no debiasing": {"debias": "none"},
           "sharp, subtract": {"debias": "subtract"}, "sharp, no dedup": {"dedup": False}, "fastv": {}, "random": {}}


def needle_tokens(frames: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Visual token numbers (raster order t, h, w) whose pixels differ from frame 0 anywhere in the
    two frames and the patch area the token covers."""
    t, h, w = grid
    moved = (np.abs(frames.astype(np.int16) - frames[:1]).max(axis=-1) > 24)  # (T, H, W)
    per_step = len(frames) // t
    rows, cols = np.array_split(np.arange(moved.shape[1]), h), np.array_split(np.arange(moved.shape[2]), w)
    hits = [(ti * h + hi) * w + wi for ti in range(t) for hi in range(h) for wi in range(w)
            if moved[ti * per_step:(ti + 1) * per_step][:, rows[hi]][:, :, cols[wi]].any()]
    return np.array(hits, dtype=np.int64)


def held_out(prefix: str):
    """(args, loaded model, folder, items) for a run over the first --items held-out items (seed 0);
    shared with research/oracle_keep.py."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--out", default=None)
    ap.add_argument("-m", "--model", default="sharp-tiny", help="sharp-tiny or a folder of another sharp-tiny.")
    args = ap.parse_args()
    loaded = loading.load(args.model, device="cpu", quant="none", dtype="float32")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    items = [json.loads(line) for line in synth.write(work, args.items, seed=0).read_text().splitlines()]
    return args, loaded, work, items


def main():
    args, loaded, work, items = held_out("sharp-dropped-")
    store = PriorStore(use_disk=False)
    rows = []
    for item in items:
        clip = video.load_video(work / item["video"], frames=32)
        prompt = build_prompt(item["question"], item["options"])

        def ask(method, **options):
            cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=args.ratio if method != "none" else 1.0,
                                                   layer=args.layer, **options))
            got = answer.ask(loaded, clip, prompt, cfg, max_new_tokens=1, store=store)
            return got, parse_letter(got.text, item["options"]) == item["answer"]

        base, base_right = ask("none")
        grid = base.encoded.layout.grid
        needles = needle_tokens(clip.frames, grid)
        row = {"id": item["id"], "task": item["category"], "needle_tokens": int(needles.size),
               "visual_tokens": int(base.encoded.layout.num_visual), "none": base_right}
        for name, options in METHODS.items():
            got, right = ask(name.split(",")[0], **options)
            kept = got.prefill.kept.numpy()
            frames_kept = np.unique(kept // (grid[1] * grid[2]))
            row[name] = {"correct": right, "needle_kept": int(np.isin(needles, kept).sum()),
                         "frames_kept": int(frames_kept.size), "unparsed": parse_letter(got.text, item["options"]) is None}
        rows.append(row)
    print(f"{args.model}, {len(rows)} held-out items (seed 0), K={args.layer}, r={args.ratio}; "
          f"needle tokens per item: median {int(np.median([r['needle_tokens'] for r in rows]))} "
          f"of {rows[0]['visual_tokens']}")
    print(f"{'method':24s} {'task':10s} {'acc':>6s} {'needle kept':>12s} {'acc | kept>=1':>14s} {'acc | none kept':>16s}"
          f" {'unparsed':>9s} {'token frames':>13s}")
    for name in ["none", *METHODS]:
        for task in ["all", *synth.BASIC]:
            sel = [r for r in rows if task in ("all", r["task"])]
            if name == "none":
                print(f"{name:24s} {task:10s} {np.mean([r['none'] for r in sel]):6.1%}")
                continue
            cells = [r[name] for r in sel]
            share = np.sum([c["needle_kept"] for c in cells]) / max(1, np.sum([r["needle_tokens"] for r in sel]))
            some = [c["correct"] for c in cells if c["needle_kept"]]
            none_kept = [c["correct"] for c in cells if not c["needle_kept"]]
            fmt = lambda v: f"{np.mean(v):.1%} ({len(v)})" if v else "-"  # noqa: E731
            print(f"{name:24s} {task:10s} {np.mean([c['correct'] for c in cells]):6.1%} {share:12.1%} "
                  f"{fmt(some):>14s} {fmt(none_kept):>16s} {np.mean([c['unparsed'] for c in cells]):9.1%} "
                  f"{np.median([c['frames_kept'] for c in cells]):13.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Where does a sharp-small checkpoint's last prompt token put its attention, layer by layer, on
language rows and on video rows? Shares of the first token, of the whole system prompt (everything
before the user's content), of the visual tokens and of the last 16 tokens, head-averaged
(scripts.train_sharp_small.attention_shares, which the progress check also prints for language).

The question it answers (issue 24): do sinks exist on the language the model was pretrained on and
vanish on video questions (then video training or the visual tokens' count is what removes them), or
are they absent on language too (then the language stage never made them)?

    python -m research.sink_probe /work/runs/small/r2 --rows 8 --json out.json

Language rows come from item numbers 10^8 and up (training reads a few 10^5 at most); video rows
from the progress-check seed 999 (never trained on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from scripts.small_checks import attention_shares, language_check_rows
from scripts.small_data import CHECK_SEED, TASKS, Items


def main(argv=None):
    from transformers import AutoModelForImageTextToText

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--rows", type=int, default=8, help="Rows of each kind.")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa",
                                                        use_kernels=False).eval()
    config, device = model.config, torch.device("cpu")
    video = Items(CHECK_SEED, TASKS, 0.0, 0.0, per_seed=10**9, frames=a.frames, answers=False)
    shares = {kind: attention_shares(model, config, rows, device, contextlib.nullcontext)
              for kind, rows in (("language", language_check_rows(a.rows)),
                                 ("video", [video[n] for n in range(a.rows)]))}
    result = {"model": str(a.model), "rows": a.rows, "frames": a.frames, **shares}
    print(f"{'layer':>5} | {'language: first':>15} {'system':>7} {'recent16':>8} | {'video: first':>12} "
          f"{'system':>7} {'visual':>7} {'recent16':>8}")
    for layer in shares["language"]:
        lg, vd = shares["language"][layer], shares["video"][layer]
        print(f"{layer:>5} | {lg['first']:>15.3f} {lg['system']:>7.3f} {lg['recent']:>8.3f} | {vd['first']:>12.3f} "
              f"{vd['system']:>7.3f} {vd['visual']:>7.3f} {vd['recent']:>8.3f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""How much a sharp-tiny model depends on the video time positions of its transformers release.

transformers 5.17 numbered a Qwen2.5-VL video's frames in time with `tokens_per_second *
int(second_per_grid_ts)`: for our 8 fps clips int(0.25 s) = 0, every frame at time 0. 5.18 and
later give 0, 0, 1, 1, ... This measures a model's held-out first-token accuracy (the training
script's measure, seed 0) both ways on the installed release: as given, and with
second_per_grid_ts set to 0, which is what 5.17 computed (docs/eval.md, "sharp-tiny").

    python -m research.time_positions_check sharp_cli/models/sharp_tiny --items 80
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts import train_sharp_tiny as train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--items", type=int, default=80)
    a = p.parse_args()
    measured = train.accuracy

    def both_ways(model, batches, tasks, device, autocast):
        batches = list(batches)
        for name, scale in (("as this release numbers them", 1.0), ("all at time 0 (5.17's numbering)", 0.0)):
            shifted = [dict(b, second_per_grid_ts=b["second_per_grid_ts"] * scale) for b in batches]
            print(f"{name}: {measured(model, shifted, tasks, device, autocast)}", flush=True)
        return {}

    train.accuracy = both_ways
    train.main(["--device", "cpu", "--frames", "32", "--steps", "0", "--init-from", str(a.model), "--workers", "1",
                "--final-items", str(a.items), "--eval-items", "4", "--out", "/tmp/time-positions-check"])


if __name__ == "__main__":
    main()

"""Make a deeper sharp-tiny from a trained one, computing the same function, to continue training.

Training an 8-layer sharp-tiny from scratch did not learn within one GPU call (research/history.md,
"GPU trainings that did not learn"), so this grows a trained model instead (block expansion, as in
LLaMA Pro): after every `--every` decoder layers it inserts a copy of the layer before, with its
attention output and MLP down projections zeroed. A zeroed block adds nothing to the residual stream, so the grown model's
logits equal the source's (checked here before saving); training then gives the new blocks a role.
`training.json` is carried over, so `train_sharp_tiny.py --init-from OUT` trains on new items only.

    python -m research.grow_sharp_tiny sharp_cli/models/sharp_tiny /tmp/grown --every 1   # 4 -> 8 layers
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch


def grow(model, every: int):
    """Insert a zeroed copy after every `every` decoder layers of `model` (in place); returns the new depth."""
    text = model.model.language_model
    grown = torch.nn.ModuleList()
    for n, layer in enumerate(text.layers):
        grown.append(layer)
        if (n + 1) % every == 0:
            extra = copy.deepcopy(layer)
            torch.nn.init.zeros_(extra.self_attn.o_proj.weight)
            torch.nn.init.zeros_(extra.mlp.down_proj.weight)
            for bias in (extra.self_attn.o_proj.bias, extra.mlp.down_proj.bias):
                if bias is not None:
                    torch.nn.init.zeros_(bias)
            grown.append(extra)
    for n, layer in enumerate(grown):  # the cache and the attention interface index layers by this
        layer.self_attn.layer_idx = n
    text.layers = grown
    config = text.config  # the same object as model.config.text_config, which is what gets saved
    config.num_hidden_layers = len(grown)
    config.layer_types = [config.layer_types[0]] * len(grown)
    return len(grown)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--every", type=int, default=1, help="Insert a block after every this many layers (1: double).")
    a = p.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    from scripts.sharp_tiny_data import HELD_OUT_SEED, MODEL_KEYS, Batcher, Items, as_tensors
    from scripts.train_sharp_tiny import TASKS, history

    model = AutoModelForImageTextToText.from_pretrained(a.source, dtype=torch.float32).eval()
    rows = [Items(HELD_OUT_SEED, TASKS, 32, 0.0, False, 10**9)[n] for n in range(4)]  # one clip of each task
    batch = as_tensors(Batcher(model.config, False)(rows))
    with torch.no_grad():
        before = model(**{k: batch[k] for k in MODEL_KEYS}).logits[:, -1]
        depth = grow(model, a.every)
        after = model(**{k: batch[k] for k in MODEL_KEYS}).logits[:, -1]
    gap = (before - after).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"the grown model's logits differ from the source's by {gap:.2e}")
    a.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    for name in a.source.iterdir():
        if name.is_file() and not name.name.startswith(("model", "config")):
            shutil.copy2(name, a.out / name.name)
    source = json.loads((a.source / "training.json").read_text())
    record = {"items_to": source["items_to"], "layers": depth, "hidden": source.get("hidden"),
              "grown_from": {"source": str(a.source), "layers": source.get("layers"), "every": a.every},
              "history": history(source)}  # train_sharp_tiny.py --init-from continues it on new items
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    params = sum(t.numel() for t in model.parameters())
    print(f"grown {a.source} to {depth} decoder layers ({params / 1e6:.2f}M parameters); logits equal to {gap:.1e}")


if __name__ == "__main__":
    main()

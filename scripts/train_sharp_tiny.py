"""Train sharp-tiny from scratch on the tasks of `sharp synth`, and save it where `--model sharp-tiny`
finds it (sharp_cli/models/sharp_tiny).

sharp-tiny is Qwen2.5-VL, transformers' own classes, at a few million parameters, with a word-level
tokenizer over the synthetic set's words: the same adapter, pruning and decoding path as the 7B
model, small enough to ship and to run on any CPU. It is trained without pruning (ShaRP is
training-free). Training items come from synth seeds 1000 and up; the progress check uses seed
999; the held-out split is `sharp synth OUT --seed 0`, never trained on, measured once at the end.

Prompts are the multiple-choice prompt `sharp eval` builds, or (a share --bare of them) the bare
question `sharp ask` gets; the target is the answer's own words (`red`, `left`, `3`) then
<|im_end|>. Two more losses, from what the renderer knows for free, make it learn at all
(docs/eval.md, "sharp-tiny": with the answer loss alone the runs stayed at chance):

- token loss (--token-loss): every visual token is taught what it shows: the colour of a square
  that differs from the first and last frames (for count: which flash it is, 1, 2, ...), the way
  the moving square goes, or `none`;
- retrieval loss (--retrieval-loss): the last decoder layer's attention from the answer's position
  should fall on the tokens that show the answer (the flash, the first flash, the last flash, the
  moving square). The shallow layers, where pruning scores tokens, get no such target unless
  --retrieval-layers names them (the shipped model had none, and pruning at K=2 failed on it).

Both only shape training; at inference sharp-tiny is a plain Qwen2.5-VL (no pruning in training:
ShaRP is training-free). The losses are in scripts/sharp_tiny_losses.py. Items are rendered in
DataLoader worker processes (scripts/sharp_tiny_data.py); the processor's pixel work runs there or
on the GPU (--preprocess). `--minutes` is a wall-clock budget: the learning rate decays over
whichever runs out first, the steps or the time, and the model is saved (float16) before it ends.
On one GPU:

    python -m scripts.train_sharp_tiny --device cuda --minutes 8.5 --workers 14 --batch 32 --lr 3e-3

The shipped model's recipe (a 4-layer model on the CPU, grown to 8 layers, continued on a GPU) is in
docs/eval.md, "sharp-tiny".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from scripts.sharp_tiny_data import (
    CHECK_SEED,
    HELD_OUT_SEED,
    MODEL_KEYS,
    NONE,
    OUT,
    PER_SEED,
    TRAIN_SEEDS_FROM,
    Batcher,
    Items,
    Piped,
    as_tensors,
    build_processor,
    pack,
    shm_is_small,
    tiny_config,
    to_device,
    unpack,
)
from scripts.sharp_tiny_losses import Retrieval, losses
from sharp_cli.evaluate.synth import BASIC as TASKS


# -- training ----------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model, batches, tasks, device, autocast) -> dict:
    """Per task: share of prompts whose first greedy answer token is the answer's."""
    model.eval()
    right = {t: [0, 0] for t in tasks}
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            logits = model(**{k: batch[k] for k in MODEL_KEYS}, logits_to_keep=1).logits[:, -1]
        for task, ok in zip(batch["task"].tolist(), (logits.argmax(-1) == batch["target"]).tolist()):
            right[tasks[task]][0] += ok
            right[tasks[task]][1] += 1
    model.train()
    return {t: round(r / n, 4) for t, (r, n) in right.items() if n}


def history(previous: dict | None) -> list:
    """The records of the runs (and growth steps) a continued model went through, oldest first."""
    if previous is None:
        return []
    return previous.get("history", []) + [{k: v for k, v in previous.items() if k not in ("log", "history")}]


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up then cosine to a tenth of the peak; progress in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="At most this many steps.")
    p.add_argument("--minutes", type=float, default=0, help="Wall-clock budget, saving included (0: none).")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="Share of the run spent warming up.")
    p.add_argument("--token-loss", type=float, default=1.0, help="Weight of the per-visual-token loss (0: off).")
    p.add_argument("--retrieval-loss", type=float, default=0.5,
                   help="Weight of the last layer's attention mass on the needles (0: off).")
    p.add_argument("--retrieval-layers", default="",
                   help="Comma list of decoder layers the retrieval loss applies to (default: the last). "
                        "Add K to teach the layer pruning scores with (layer K's own attention, on what "
                        "layers 0..K-1 produce) to attend to the answer's tokens.")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--frames", type=int, default=32, help="Frames per training clip (sharp eval samples 32).")
    p.add_argument("--bare", type=float, default=0.25, help="Share of prompts that are the bare question.")
    p.add_argument("--pool", type=int, default=0, help="Cycle over this many training items (0: fresh ones).")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preprocess", choices=("auto", "workers", "device"), default="auto",
                   help="Where the processor's pixel work runs: the worker processes, or the device "
                        "(auto: the device when it is a GPU and gives the workers' numbers).")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes rendering items.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-items", type=int, default=128, help="Progress-check items (seed 999).")
    p.add_argument("--final-items", type=int, default=400, help="Held-out items (seed 0) measured at the end.")
    p.add_argument("--init-from", type=Path,
                   help="Start from a saved sharp-tiny folder (same sizes), not from scratch.")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def choose_preprocess(a, config, device) -> str:
    """The device path only where it matches the workers' (CPU) numbers on two real items."""
    if a.preprocess != "auto":
        return a.preprocess
    if device.type != "cuda":
        return "workers"
    rows = [Items(CHECK_SEED, TASKS, a.frames, 0.5, per_seed=10**9)[n] for n in range(2)]
    try:
        here, there = Batcher(config, True)(rows), Batcher(config, True, device)(unpack(pack(rows), device))
        same = (torch.equal(here["input_ids"], there["input_ids"].cpu()) and torch.allclose(
            here["pixel_values_videos"], there["pixel_values_videos"].float().cpu(), atol=1e-3))
    except Exception as exc:  # an older processor without device support: stay on the CPU
        print(f"preprocess on {device} failed ({type(exc).__name__}: {exc}); using the workers", flush=True)
        return "workers"
    if not same:
        print(f"preprocess on {device} differs from the CPU's; using the workers", flush=True)
    return "device" if same else "workers"


def main(argv=None):
    a = parse_args(argv)
    start = time.time()
    deadline = start + a.minutes * 60 if a.minutes else math.inf
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import AutoModelForImageTextToText

    from sharp_cli.models import vision_attention

    device = torch.device(a.device)
    tasks = tuple(t for t in a.tasks.split(",") if t)
    config = tiny_config(hidden=a.hidden, layers=a.layers, vision_depth=a.vision_depth, vision_hidden=a.vision_hidden)
    config._attn_implementation = "sdpa"
    offset, previous = 0, None
    if a.init_from:  # a second budget for the same run: its config is the saved one; new items only
        model = AutoModelForImageTextToText.from_pretrained(a.init_from, dtype=torch.float32,
                                                            attn_implementation="sdpa").to(device)
        config = model.config
        previous = json.loads((a.init_from / "training.json").read_text())
        offset = previous["items_to"]
    else:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device)
    # One SDPA call per window length in the vision tower, not one per window (exact attention).
    model.model.visual.config._attn_implementation = vision_attention.register()
    processor = build_processor(config)
    none_id = processor.tokenizer.convert_tokens_to_ids(NONE)
    last = config.text_config.num_hidden_layers - 1
    layers = {int(n) for n in a.retrieval_layers.split(",")} if a.retrieval_layers else {last}
    if not layers <= set(range(last + 1)):
        raise SystemExit(f"--retrieval-layers: the decoder has layers 0..{last}")
    retrieval = Retrieval(layers)
    if a.retrieval_loss:
        retrieval.register(model)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else (lambda: torch.autocast("cpu", enabled=False)))
    preprocess = choose_preprocess(a, config, device)
    piped = shm_is_small(a.workers, a.batch, a.frames)
    if piped:
        print("/dev/shm is small for the batches in flight: workers hand them over through pipes", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"sharp-tiny: {params / 1e6:.2f}M parameters, tasks {','.join(tasks)}, {a.frames} frames, batch {a.batch}, "
          f"lr {a.lr}, token loss {a.token_loss}, retrieval loss {a.retrieval_loss}, on {device}, "
          f"{a.workers} workers, preprocess on "
          f"{'the device' if preprocess == 'device' else 'the workers'}", flush=True)

    def batches(seed_from, count, answers, batch, shuffle_seed=None, workers=a.workers, per_seed=PER_SEED, offset=0):
        data = Items(seed_from, tasks, a.frames, a.bare if answers else 0.0, answers, per_seed, count, offset)
        sampler = None
        if shuffle_seed is not None:
            sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(shuffle_seed))
        on_device = Batcher(config, answers, device) if preprocess == "device" else None
        collate = pack if on_device else Batcher(config, answers)
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch, sampler=sampler, num_workers=workers, prefetch_factor=4 if workers else None,
            collate_fn=Piped(collate) if piped else collate, pin_memory=device.type == "cuda" and not piped)
        if on_device:
            return (on_device(unpack(packed, device)) for packed in loader)
        return (as_tensors(b) for b in loader)

    # A few workers: starting many for two batches would cost more than it saves.
    check = lambda: batches(CHECK_SEED, a.eval_items, False, 64, workers=min(4, a.workers), per_seed=10**9)  # noqa: E731
    if a.pool:  # a fixed set, reshuffled every pass
        passes = -(-a.steps * a.batch // a.pool)
        train = (b for n in range(passes) for b in batches(TRAIN_SEEDS_FROM, a.pool, True, a.batch, a.seed + n))
    else:  # fresh items, in order: item n is the same in every run
        train = batches(TRAIN_SEEDS_FROM, a.steps * a.batch, True, a.batch, offset=offset)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-8)
    log, seen, step, wait, skipped = [], 0, 0, 0.0, 0
    running = torch.zeros(4, device=device)  # answer, token, retrieval losses, steps: summed on the device
    # The held-out pass, a last check and saving: seconds on a GPU, a minute on a CPU.
    reserve = (15 if device.type == "cuda" else 60) + (a.final_items + a.eval_items) * 0.02 if a.minutes else 0
    train_start = time.time()
    model.train()
    for step in range(1, a.steps + 1):
        fetched = time.time()
        batch = next(train, None)
        if batch is None:
            break
        batch = to_device(batch, device)
        wait += time.time() - fetched
        progress = max(step / a.steps, (time.time() - train_start) / max(1e-9, deadline - reserve - train_start))
        for group in opt.param_groups:
            group["lr"] = lr_at(min(progress, 1.0), a.lr, a.warmup)
        if a.retrieval_loss:
            retrieval.arm(batch)
        with autocast():
            logits = model(**{k: batch[k] for k in MODEL_KEYS}).logits
        answer, token = losses(logits, batch, config.video_token_id, none_id)
        fetch = retrieval.loss(batch, config.video_token_id) if a.retrieval_loss else answer.new_zeros(())
        opt.zero_grad(set_to_none=True)
        (answer + a.token_loss * token + a.retrieval_loss * fetch).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            opt.step()
        else:  # one bad batch must not end a run that has no second chance
            skipped += 1
        seen += len(batch["task"])
        running += torch.stack([answer.detach(), token.detach(), fetch.detach(), answer.new_ones(())])
        out_of_time = time.time() > deadline - reserve
        last = step == a.steps or out_of_time
        if step % a.log_every == 0 or step % a.eval_every == 0 or step == 1 or last:
            mean = (running[:3] / running[3]).tolist()
            running.zero_()
            elapsed = time.time() - train_start
            print(f"step {step} answer loss {mean[0]:.4f} token loss {mean[1]:.4f} retrieval loss {mean[2]:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} "
                  f"{elapsed:.0f}s {seen / elapsed:.1f} items/s (waited {wait:.0f}s for data)", flush=True)
        if step % a.eval_every == 0 or last:
            log.append({"step": step, "items": seen, "answer_loss": round(mean[0], 4), "token_loss": round(mean[1], 4),
                        "retrieval_loss": round(mean[2], 4),
                        "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - start, 1),
                        "check_accuracy": accuracy(model, check(), tasks, device, autocast)})
            print(json.dumps(log[-1]), flush=True)
        if out_of_time:
            break
    final = accuracy(model, batches(HELD_OUT_SEED, a.final_items, False, 64, per_seed=10**9), tasks, device, autocast)
    print(json.dumps({"held_out_seed": HELD_OUT_SEED, "held_out_items": a.final_items, "accuracy": final}), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    # Half precision halves the file (float16 keeps more mantissa than bfloat16); sharp loads it in
    # the dtype it runs in (float32 on CPU).
    model.model.language_model.config._attn_implementation = "sdpa"  # not the training-only names
    model.model.visual.config._attn_implementation = "sdpa"
    model.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    processor.tokenizer.padding_side = "right"
    processor.save_pretrained(a.out)
    record = {"parameters": params, "steps": step, "items": seen, "batch": a.batch, "lr": a.lr, "warmup": a.warmup,
              "token_loss": a.token_loss, "retrieval_loss": a.retrieval_loss,
              "retrieval_layers": sorted(layers), "seed": a.seed, "tasks": list(tasks), "frames": a.frames,
              "bare": a.bare,
              "pool": a.pool, "hidden": config.text_config.hidden_size, "layers": config.text_config.num_hidden_layers,
              "vision_depth": config.vision_config.depth, "vision_hidden": config.vision_config.hidden_size,
              "device": str(device), "preprocess": preprocess, "workers": a.workers, "piped": piped,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "seconds": round(time.time() - start, 1), "data_wait_seconds": round(wait, 1),
              "skipped_steps": skipped,
              "train_seeds": f"{TRAIN_SEEDS_FROM}..", "check_seed": CHECK_SEED, "items_from": offset,
              "items_to": offset + (a.pool or seen),
              "init_from": str(a.init_from) if a.init_from else None, "history": history(previous),
              "held_out": {"seed": HELD_OUT_SEED, "items": a.final_items, "first_token_accuracy": final}, "log": log}
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {a.out} in {time.time() - start:.0f}s", flush=True)
    return record


if __name__ == "__main__":
    main()

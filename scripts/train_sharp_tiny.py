"""Train sharp-tiny from scratch on the tasks of `sharp synth`, and save it where `--model sharp-tiny`
finds it (sharp_cli/models/sharp_tiny).

sharp-tiny is Qwen2.5-VL, transformers' own classes, at a few million parameters, with a word-level
tokenizer over the synthetic set's words: the same adapter, pruning and decoding path as the 7B
model, small enough to ship and to run on any CPU. Training items are drawn in memory from synth
seeds 1000 and up; the held-out split is `sharp synth OUT --seed 0` (seed 0 is never trained on).
Half the prompts are the multiple-choice prompt `sharp eval` builds, half the bare question; the
target is the answer's own words (`red`, `left`, `3`) then <|im_end|>. `sharp eval` reads an
answer that names one option's text as that option (docs/eval.md), and `sharp ask` gets a plain
answer to a plain question. Answering with a letter would also have to learn to point from the
answer to its option, which from scratch at this size took more steps than a CPU run affords.

    python scripts/train_sharp_tiny.py --steps 2000 --batch 8 [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sharp_cli.evaluate.letters import INSTRUCTION, LETTERS, build_prompt
from sharp_cli.evaluate.synth import DIRECTIONS, PALETTE, TASKS, make_item
from sharp_cli.models.qwen import QwenVLAdapter
from sharp_cli.models.random_init import build_random, synthetic_tokenizer
from sharp_cli.video import VideoClip

OUT = Path(__file__).resolve().parent.parent / "sharp_cli" / "models" / "sharp_tiny"
MAX_PIXELS = 112 * 112  # 128-pixel synth frames -> 112x112 -> 16 tokens per two frames
HELD_OUT_SEED = 0
TRAIN_SEEDS_FROM = 1000


def vocabulary() -> list[str]:
    words = set()
    for seed in (1, 2):
        for i in range(64):
            _, item = make_item(seed, i, frames=8, size=64)
            words.update(build_prompt(item["question"], item["options"]).replace("'", " ' ").split())
    words.update(PALETTE, DIRECTIONS, INSTRUCTION.replace("'", " ' ").split())
    return sorted(w.strip(".,?!:;()") for w in words if w.strip(".,?!:;()"))


def tiny_config(vocab: int = 256):
    from transformers import Qwen2_5_VLConfig

    special = {"bos": vocab - 12, "eos": vocab - 10, "vstart": vocab - 9, "vend": vocab - 8, "vpad": vocab - 7,
               "image": vocab - 6, "video": vocab - 5}
    text = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                bos_token_id=special["bos"], eos_token_id=special["eos"], tie_word_embeddings=False)
    vision = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                  tokens_per_second=2)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=special["image"],
                            video_token_id=special["video"], vision_start_token_id=special["vstart"],
                            vision_end_token_id=special["vend"], vision_token_id=special["vpad"],
                            bos_token_id=special["bos"], eos_token_id=special["eos"])


TARGET = "words"  # --target: "words" (the default) or "letter" (multiple-choice prompts only)


def answer_text(item) -> str:
    return item["answer"] if TARGET == "letter" else item["options"][LETTERS.index(item["answer"])]


def batch_inputs(processor, adapter, items, answers: bool, bare=()):
    """Processor tensors for [(frames, item)], left-padded: the multiple-choice prompt, or the bare
    question for the positions in `bare`; with answers, the answer's words and <|im_end|> follow."""
    texts, videos, metadata = [], [], []
    for n, (frames, item) in enumerate(items):
        question = item["question"] if n in bare else build_prompt(item["question"], item["options"])
        prompt = adapter.prompt(processor, question)
        texts.append(prompt + (answer_text(item) + "<|im_end|>" if answers else ""))
        clip = VideoClip(frames, 8.0, len(frames), list(range(len(frames))), "synthetic", item["id"], [])
        videos.append(frames)
        metadata.append(clip.metadata())
    return processor(text=texts, videos=videos, return_tensors="pt", padding=True, do_sample_frames=False,
                     video_metadata=metadata)


def answer_accuracy(model, processor, adapter, items, device):
    """Share of multiple-choice prompts whose first greedy token is the answer, per task."""
    right: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 8):
            chunk = items[start:start + 8]
            logits = model(**batch_inputs(processor, adapter, chunk, False).to(device)).logits[:, -1]
            for (_, item), guess in zip(chunk, processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())):
                right.setdefault(item["category"], []).append(int(guess == answer_text(item)))
    model.train()
    return {task: sum(v) / len(v) for task, v in sorted(right.items())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-items", type=int, default=96)
    p.add_argument("--minutes", type=float, default=0, help="Stop after this long (0: no limit).")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--target", choices=("words", "letter"), default="words",
                   help="Answer with the option's words (half the prompts bare questions), or its letter.")
    a = p.parse_args()
    global TARGET
    TARGET = a.target
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    config = tiny_config()
    adapter = QwenVLAdapter()
    model, processor = build_random(config, dtype="float32", device=device, seed=a.seed)
    processor.tokenizer = synthetic_tokenizer(adapter.special_tokens(config), config.text_config.vocab_size,
                                              vocabulary())
    processor.tokenizer.padding_side = "left"
    # Saved with the processor, so `sharp ask/eval` see the frames at the size they were trained at.
    processor.video_processor.size = adapter.video_size(processor.video_processor, 32, MAX_PIXELS)
    params = sum(p.numel() for p in model.parameters())
    print(f"sharp-tiny: {params / 1e6:.2f}M parameters, {a.steps} steps of {a.batch} on {device}", flush=True)
    held_out = [make_item(HELD_OUT_SEED + 999_000, i) for i in range(a.eval_items)]  # quick check only
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    log, start, step = [], time.time(), 0
    model.train()
    for step in range(1, a.steps + 1):
        items = [make_item(TRAIN_SEEDS_FROM + step, i) for i in range(a.batch)]
        bare = range(1, a.batch, 2) if TARGET == "words" else ()
        inputs = batch_inputs(processor, adapter, items, True, bare=bare).to(device)
        logits = model(**inputs).logits[:, -3:-1]  # predicts the answer word, then <|im_end|>
        targets = inputs["input_ids"][:, -2:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
        out_of_time = a.minutes and time.time() - start > a.minutes * 60
        if step % a.eval_every == 0 or step == a.steps or out_of_time:
            acc = answer_accuracy(model, processor, adapter, held_out, device)
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start),
                        "accuracy": acc})
            print(json.dumps(log[-1]), flush=True)
        if out_of_time:
            break
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    processor.save_pretrained(a.out)
    record = {"parameters": params, "steps": step, "batch": a.batch, "lr": a.lr, "seed": a.seed, "target": TARGET,
              "device": str(device), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "seconds": round(time.time() - start), "tasks": list(TASKS),
              "train_seeds": f"{TRAIN_SEEDS_FROM}..{TRAIN_SEEDS_FROM + step}", "log": log}
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {a.out}", flush=True)


if __name__ == "__main__":
    main()

"""Train sharp-small, the test model whose shallow layers should behave like a real video LLM's
(docs/eval.md, "sharp-small"), and save it where `-m sharp-small` finds it.

Qwen2.5-VL's own classes at ~17M parameters (16 decoder layers, 8 query / 2 KV heads). A language
stage first (`--language 1.0`: documents of a bigram language, copying, recall, counting; every
sequence behind the same system prompt), then video and language mixed (`--language 0.3`). Losses:
next-token loss on the supervised tokens (scripts/small_data.py), a per-visual-token loss (what each
token shows, from the renderer: a stand-in for a vision encoder trained on real data) and, on one
decoder layer (`--retrieval-layer`, the last by default), a retrieval loss (the answer position's
attention mass on the tokens that show the answer). No loss touches the shallow layers' attention
(issue 24: none on layers <= K+2, K=2; the option refuses them).
Weight decay 0.1 keeps norms in check. Training runs without pruning: ShaRP is training-free.

Every `--eval-every` steps it prints the progress check (seed 999, never trained on): teacher-forced
exact-answer accuracy per task and the shallow-attention statistics of sharp_cli/evaluate/diagnose.py
at layers 1, 2 and L/2 on content and on black clips, the first token's share of the last token's
attention at every layer on language questions (attention sinks: `attention_shares`), and saves the
model (float16) to --out, so a run cut short by its time budget still leaves a checkpoint.
`--init-from` continues a saved model on new items (offset by the items it has seen), with a fresh
optimizer and warm-up. On one GPU:

    python -m scripts.train_sharp_small --device cuda --minutes 8 --workers 14 --language 1.0 --out /tmp/small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from scripts.small_checks import check, inputs_of, to_device
from scripts.small_circuits import freeze_language, freeze_query_key, held_entries, planted_before
from scripts.small_data import (
    CHECK_SEED,
    NONE,
    PER_SEED,
    TASKS,
    TRAIN_SEEDS_FROM,
    Batcher,
    Items,
    build_processor,
    pack,
    small_config,
    unpack,
)
from scripts.small_losses import RETRIEVAL_FLOOR, LayerRetrieval, losses

OUT = Path(__file__).resolve().parent.parent / "sharp_cli" / "models" / "sharp_small"


def compile_layers(model, backend: str = "inductor", skip: int = -1) -> int:
    """Compiles each text decoder layer but `skip` (where the retrieval loss's capture runs; the last by
    default) on its own, with dynamic shapes: one graph serves every layer and every batch's length (regional
    compilation), and the norms, rotary embedding, activation and residual adds of forward and
    backward become a few fused kernels. Why: on the H200 a step was ~4,200 kernel launches, half of
    its GPU time elementwise work and autocast copies (research/results/h200-sharp-small-r2.log's
    profile). Returns how many layers it compiled."""
    layers = model.model.language_model.layers
    skip %= len(layers)
    for n, layer in enumerate(layers):
        if n != skip:
            layer.compile(backend=backend, dynamic=True)
    return len(layers) - 1


def load_model(init_from: Path | None, device, **config_kwargs):
    """(model in float32 on `device`, the training record it continues or None): a saved sharp-small
    when `init_from`, else a new one of small_config(**config_kwargs)."""
    from transformers import AutoModelForImageTextToText

    if init_from:
        # use_kernels=False: transformers 5.2x would swap layers for hub kernels (a download) in train()
        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32,
                                                            attn_implementation="sdpa", use_kernels=False)
        return model.to(device), json.loads((init_from / "training.json").read_text())
    config = small_config(**config_kwargs)
    config._attn_implementation = "sdpa"
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device), None


def optimizer(model, lr: float, weight_decay: float):
    """AdamW over the parameters that learn; weight decay on matrices only, never the embeddings."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in trained if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def autocast_for(device):
    """bf16 autocast on CUDA, float32 elsewhere (a context factory)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def history_of(previous: dict | None) -> list:
    """The runs before this one: the continued record's history and that record itself (no logs)."""
    if not previous:
        return []
    return previous.get("history", []) + [{k: v for k, v in previous.items() if k not in ("log", "history")}]


def lr_at(progress: float, peak: float, warmup: float) -> float:
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def save(model, processor, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text_impl = model.model.language_model.config._attn_implementation
    model.model.language_model.config._attn_implementation = "sdpa"  # not the training-only name
    model.model.visual.config._attn_implementation = "sdpa"
    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    model.model.language_model.config._attn_implementation = text_impl
    processor.tokenizer.padding_side = "right"
    processor.save_pretrained(out)
    processor.tokenizer.padding_side = "left"
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--minutes", type=float, default=0, help="Wall-clock budget, saving included (0: none).")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="Warm-up as a share of the run (steps or clock).")
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="And at least this many steps: a compiled run's first step takes seconds of its clock "
                        "(scripts.pretrain_small_lm went to NaN when the clock's warm-up was over by step 2).")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--language", type=float, default=0.3, help="Share of rows from the language stage.")
    p.add_argument("--bare", type=float, default=0.3, help="Share of video questions asked bare (no options).")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--token-loss", type=float, default=0.5)
    p.add_argument("--retrieval-loss", type=float, default=0.25, help="On --retrieval-layer only (0: off).")
    p.add_argument("--retrieval-layer", type=int, default=-1,
                   help=f"The decoder layer the retrieval loss trains (-1: the last; >= {RETRIEVAL_FLOOR}). A real "
                   "VLM moves what it reads from the video into the text rows in its middle layers.")
    p.add_argument("--drop-visual-share", type=float, default=0.0, help="Share of video rows whose text sees no "
                   "visual token from --drop-visual-from on (0: off; needs the retrieval loss's attention function).")
    p.add_argument("--drop-visual-from", type=int, default=8, help="The first decoder layer of the visual drop "
                   "(deeper than --retrieval-layer; 8: L/2, where FastV's deep pruning should cost little).")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rope-theta", type=float, default=10000.0, help="From scratch only: RoPE theta.")
    p.add_argument("--tokens-per-second", type=int, default=8, help="From scratch only: temporal position "
                   "step per second of video (8: 2 per token frame at 8 fps).")
    p.add_argument("--mrope-section", default="4,6,6", help="From scratch only: rotary frequencies of the "
                   "temporal, height and width bands (fastest first; sum 16 at head dim 32).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500, help="Steps between progress checks (0: at the end only).")
    p.add_argument("--check-items", type=int, default=24, help="Progress-check items (seed 999), a few per task.")
    p.add_argument("--freeze-language", action="store_true", help="Train the vision tower and merger only.")
    p.add_argument("--compile", default="", help="Compile the decoder layers with this torch.compile backend "
                   "(inductor on a GPU; empty: eager).")
    p.add_argument("--profile", type=int, default=0, help="Profile steps 20..20+N with torch.profiler and print "
                   "the top operators (CPU and CUDA time), then go on training.")
    p.add_argument("--hold-planted", action="store_true", help="Keep scripts.plant_priors' circuits (sinks, "
                   "recency) as --init-from has them: their entries are put back after every step.")
    p.add_argument("--freeze-qk-layers", default="", help="Comma list of decoder layers whose query and key "
                   "projections do not learn (e.g. 0,1,2: the shallow attention stays as --init-from has it).")
    p.add_argument("--init-from", type=Path)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    start = time.time()
    deadline = start + a.minutes * 60 if a.minutes else math.inf
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    from sharp_cli.models import vision_attention

    device = torch.device(a.device)
    tasks = tuple(t for t in a.tasks.split(",") if t)
    model, previous = load_model(a.init_from, device, hidden=a.hidden, layers=a.layers, rope_theta=a.rope_theta,
                                 tokens_per_second=a.tokens_per_second,
                                 mrope_section=tuple(int(n) for n in a.mrope_section.split(",")))
    config, offset = model.config, previous["items_to"] if previous else 0
    model.model.visual.config._attn_implementation = vision_attention.register()
    processor = build_processor(config)
    none_id = processor.tokenizer.convert_tokens_to_ids(NONE)
    last = config.text_config.num_hidden_layers - 1
    retrieval_layer = a.retrieval_layer % (last + 1)
    if retrieval_layer != last and retrieval_layer < RETRIEVAL_FLOOR:
        raise SystemExit(f"--retrieval-layer {a.retrieval_layer}: the retrieval loss may train layer "
                         f"{RETRIEVAL_FLOOR} or deeper (none on layers <= K+2)")
    if a.drop_visual_share and not (a.retrieval_loss and retrieval_layer < a.drop_visual_from <= last):
        raise SystemExit(f"--drop-visual-from {a.drop_visual_from}: a layer after the retrieval loss's "
                         f"({retrieval_layer}, whose loss reads the visual tokens) up to {last}, with the loss on")
    retrieval = LayerRetrieval(retrieval_layer, a.drop_visual_from, a.drop_visual_share)
    if a.retrieval_loss:
        retrieval.register(model)
    if a.compile:
        compiled = compile_layers(model, a.compile, retrieval_layer)
        print(f"compiling {compiled} decoder layers ({a.compile}, dynamic shapes)", flush=True)
    autocast = autocast_for(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"sharp-small: {params / 1e6:.2f}M parameters, language share {a.language}, tasks {','.join(tasks)}, "
          f"batch {a.batch}, lr {a.lr}, on {device}, {a.workers} workers, items from {offset}", flush=True)
    check_rows = [Items(CHECK_SEED, tasks, 0.0, 0.0, per_seed=10**9)[n] for n in range(a.check_items)]
    data = Items(TRAIN_SEEDS_FROM, tasks, a.language, a.bare, count=a.steps * a.batch, offset=offset, per_seed=PER_SEED)
    # Workers render and label; the processor's pixel work runs on the device (uint8 frames cross
    # the process boundary and the bus, a quarter of the float32 pixels' bytes).
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch, num_workers=a.workers, collate_fn=pack,
                                         prefetch_factor=4 if a.workers else None, pin_memory=device.type == "cuda")
    batcher = Batcher(config, device=device)
    if a.freeze_language:
        freeze_language(model)
    frozen_qk = [int(n) for n in a.freeze_qk_layers.split(",") if n]
    freeze_query_key(model, frozen_qk)
    opt = optimizer(model, a.lr, a.weight_decay)
    held = held_entries(model, planted_before(a.init_from)) if a.hold_planted and a.init_from else []
    log, seen, wait, skipped, step = [], 0, 0.0, 0, 0
    prep = compute = 0.0  # seconds in the processor call and in forward/backward/step (synchronised)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    running = torch.zeros(4, device=device)
    record = {}
    reserve = 25 if device.type == "cuda" else 90
    train_start = time.time()
    model.train()
    batches = iter(loader)
    profiler = None

    def make_record(final_check=None):
        return {"parameters": params, "steps": step, "items": seen, "batch": a.batch, "lr": a.lr, "warmup": a.warmup,
                "warmup_steps": a.warmup_steps,
                "weight_decay": a.weight_decay, "language": a.language, "bare": a.bare, "token_loss": a.token_loss,
                "retrieval_loss": a.retrieval_loss, "retrieval_layers": [retrieval_layer],
                "drop_visual_share": a.drop_visual_share, "drop_visual_from": a.drop_visual_from,
                "tasks": list(tasks), "seed": a.seed, "compile": a.compile, "freeze_language": a.freeze_language,
                "hold_planted": a.hold_planted, "freeze_qk_layers": frozen_qk,
                "hidden": config.text_config.hidden_size,
                "layers": config.text_config.num_hidden_layers, "device": str(device), "workers": a.workers,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                "transformers": __import__("transformers").__version__, "seconds": round(time.time() - start, 1),
                "data_wait_seconds": round(wait, 1), "processor_seconds": round(prep, 1),
                "compute_seconds": round(compute, 1), "skipped_steps": skipped,
                "train_seeds": f"{TRAIN_SEEDS_FROM}..", "check_seed": CHECK_SEED, "items_from": offset,
                "items_to": offset + seen, "init_from": str(a.init_from) if a.init_from else None,
                "history": history_of(previous), "last_check": final_check, "log": log}

    while step < a.steps:
        fetched = time.time()
        if a.profile and step == 20:
            kinds = [torch.profiler.ProfilerActivity.CPU]
            kinds += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
            profiler = torch.profiler.profile(activities=kinds)
            profiler.__enter__()
        if profiler is not None and step == 20 + a.profile:
            profiler.__exit__(None, None, None)
            keys = ("self_cuda_time_total", "self_cpu_time_total") if device.type == "cuda" else ()
            for key in keys or ("self_cpu_time_total",):
                print(profiler.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)
            profiler = None
        packed = next(batches, None)
        if packed is None:
            break
        step += 1
        wait += time.time() - fetched
        prepared = time.time()
        batch = to_device(batcher(unpack(packed, device)), device)
        sync()
        prep += time.time() - prepared
        computed = time.time()
        progress = max(step / a.steps, (time.time() - train_start) / max(1e-9, deadline - reserve - train_start))
        for group in opt.param_groups:
            group["lr"] = lr_at(min(progress, 1.0), a.lr, a.warmup) * min(1.0, step / max(1, a.warmup_steps))
        if a.retrieval_loss:
            retrieval.arm(batch, config.video_token_id)
        with autocast():
            logits = model(**inputs_of(batch), use_cache=False).logits  # no KV cache to fill
        lm, token = losses(logits, batch, config.video_token_id, none_id)
        fetch = retrieval.loss(batch, config.video_token_id) if a.retrieval_loss else lm.new_zeros(())
        opt.zero_grad(set_to_none=True)
        total = lm + a.token_loss * token + a.retrieval_loss * fetch
        if total.requires_grad:  # with --freeze-language a batch of language rows alone trains nothing
            total.backward()
        if total.requires_grad and torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            opt.step()
            with torch.no_grad():
                for param, index, values in held:
                    param.view(-1).index_copy_(0, index, values)
        else:
            skipped += 1
        sync()
        compute += time.time() - computed
        seen += len(batch["task"])
        running += torch.stack([lm.detach(), token.detach(), fetch.detach().float(), lm.new_ones(())])
        out_of_time = time.time() > deadline - reserve
        last = step == a.steps or out_of_time
        checking = last or (a.eval_every > 0 and step % a.eval_every == 0)
        if step % a.log_every == 0 or step == 1 or checking:
            mean = (running[:3] / running[3]).tolist()
            running.zero_()
            elapsed = time.time() - train_start
            print(f"step {step} lm {mean[0]:.4f} token {mean[1]:.4f} retrieval {mean[2]:.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} "
                  f"{elapsed:.0f}s {seen / elapsed:.1f} rows/s (waited {wait:.0f}s for data, {prep:.0f}s processor, "
                  f"{compute:.0f}s forward/backward)", flush=True)
        if checking:
            result = check(model, config, check_rows, device, autocast)
            log.append({"step": step, "items": seen, "lm": round(mean[0], 4), "token": round(mean[1], 4),
                        "retrieval": round(mean[2], 4), "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.time() - start, 1), **result})
            print(json.dumps(log[-1]), flush=True)
            record = make_record(result)
            save(model, processor, a.out, record)
        if out_of_time:
            break
    print(f"saved {a.out} after {step} steps, {seen} rows, in {time.time() - start:.0f}s", flush=True)
    return record


if __name__ == "__main__":
    main()

"""sharp-small's progress checks (scripts.train_sharp_small and scripts.pretrain_small_lm print them):
teacher-forced accuracy per task, the shallow-attention statistics of sharp_cli/evaluate/diagnose.py,
and where the last token's attention goes at every layer (`attention_shares`: the first token, the
system turn, the visual tokens, the last 16 tokens) on items never trained on."""

from __future__ import annotations

import time

import torch

from scripts.small_data import CHECK_SEED, TASKS, Batcher, Items, black_rows, build_processor, pack, unpack
from sharp_cli.evaluate import diagnose

MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
              "second_per_grid_ts")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def inputs_of(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


LANGUAGE_CHECK_FROM = 10**8  # language item numbers no training run reaches (a run reads ~10^5)


def language_check_rows(count: int) -> list[dict]:
    """`count` language questions (copy, recall, count) never trained on; a document's prompt ends
    before its text, so documents are skipped."""
    items = Items(CHECK_SEED, TASKS, 1.0, 0.0, offset=LANGUAGE_CHECK_FROM)
    return [r for r in (items[n] for n in range(4 * count)) if r["user"]][:count]


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def attention_shares(model, config, rows, device, autocast) -> dict:
    """{layer: {first, system, visual, recent}}: the last prompt token's head-averaged attention on
    the first token, on the system turn (everything before the user's <|im_start|>), on the visual
    tokens and on the last 16 tokens, at every decoder layer, mean over rows (one at a time: no
    padding). Real LLMs park most of it on the first token from layer 2 on (attention sinks); the
    language rows say whether the language stage made any, the video rows whether they survive."""
    model.eval()
    text_config = model.model.language_model.config
    layers = list(range(config.text_config.num_hidden_layers))
    batcher = Batcher(config, answers=False, device=device)
    im_start = build_processor(config).tokenizer.convert_tokens_to_ids("<|im_start|>")
    total = {layer: torch.zeros(4, device=device) for layer in layers}
    for row in rows:
        batch = to_device(batcher(unpack(pack([row]), device)), device)
        ids = batch["input_ids"][0]
        starts = (ids == im_start).nonzero().squeeze(1)
        user = int(starts[1]) if len(starts) > 1 else len(ids)
        visual = ids == config.video_token_id
        with diagnose.capture(text_config, layers) as rec, autocast():
            model(**inputs_of(batch), logits_to_keep=1)
        for layer in layers:
            p = rec.probs[layer][0].mean(0)  # (L,)
            total[layer] += torch.stack([p[0], p[:user].sum(), p[visual].sum(), p[-16:].sum()])
    model.train()
    return {layer: dict(zip(("first", "system", "visual", "recent"), (round(v / len(rows), 4) for v in t.tolist())))
            for layer, t in total.items()}


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compiled layers (--compile) would recompile for the capture
def check(model, config, rows, device, autocast) -> dict:
    """Teacher-forced exact-answer accuracy per task, and the shallow-attention statistics (layers
    1, 2, L/2) on the check clips and on the same clips black."""
    began = time.time()
    model.eval()
    text_config = model.model.language_model.config
    depth = config.text_config.num_hidden_layers
    layers = sorted(n for n in {1, 2, depth // 2} if n < depth)
    right: dict[str, list[int]] = {}
    batch = to_device(Batcher(config, answers=True, device=device)(unpack(pack(rows), device)), device)
    with autocast():
        logits = model(**inputs_of(batch), use_cache=False).logits
    ids, mask = batch["input_ids"], batch["loss_mask"]
    hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~mask[:, 1:]
    for task, ok in zip(batch["task"].tolist(), hit.all(1).tolist()):
        right.setdefault(TASKS[task], [0, 0])
        right[TASKS[task]][0] += ok
        right[TASKS[task]][1] += 1
    phases = {"accuracy": round(time.time() - began, 1)}
    stats = {}
    for name, these in (("content", rows), ("black", black_rows(rows))):
        batch = to_device(Batcher(config, answers=False, device=device)(unpack(pack(these), device)), device)
        with diagnose.capture(text_config, layers) as rec, autocast():
            rec.visible = batch["attention_mask"].bool()
            model(**inputs_of(batch), logits_to_keep=1)
        ids = batch["input_ids"]
        for layer in layers:
            per_row = []
            for b in range(ids.shape[0]):
                visual = (ids[b] == config.video_token_id).nonzero().squeeze(1)
                start = int((ids[b] == config.vision_start_token_id).nonzero()[0])
                first = int(batch["attention_mask"][b].nonzero()[0])
                frames = int(batch["video_grid_thw"][b, 0])
                per_row.append(diagnose.row_stats(rec.probs[layer][b], visual, frames,
                                                  torch.arange(first, start, device=ids.device)))
            mean = diagnose.mean_stats(per_row)
            mean["shape"] = diagnose.profile_shape(mean.pop("frames"))
            stats[f"{name}_layer{layer}"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in mean.items()}
        phases[name] = round(time.time() - began, 1)
    language = attention_shares(model, config, language_check_rows(max(2, len(rows) // 2)), device, autocast)
    phases["language"] = round(time.time() - began, 1)
    model.train()
    return {"accuracy": {t: round(r / n, 4) for t, (r, n) in right.items()}, "attention": stats,
            "language_first_token": {layer: v["first"] for layer, v in language.items()}, "check_seconds": phases}

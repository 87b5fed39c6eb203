"""Pretrain sharp-small's language model alone, at the speed of a language model: the stage a real
video LLM starts from (its language model trained on text first, then the vision tower attached).

Why: attention sinks, the first token taking most of a late token's attention, are learned from a
great deal of text; in the mixed stages of scripts.train_sharp_small they never appeared, not even
on language (docs/eval.md, "Where the sinks are"), and small CPU models did not grow them in 24M
tokens. There the language stage ran at the speed of the VLM's data path (chat-formatted rows made
one by one in data workers, padded to the batch's longest); here whole batches of sharp-small's
language are drawn on the device in a few tensor operations and every position is trained on.

A sequence: the system turn and the user header, exactly as the chat template writes them, then one
long document of the fixed synthetic language (scripts/small_data.Grammar: each word followed by one
of its 6 likely successors half the time, a word of the current topic (holding 20-60 words) a third
of the time, else any word by its Zipfian frequency) in which, with probability `--triggers`, one of
8 rare words is a trigger: trigger i is followed by the word i + 1 places before it (a sparse job a
head can own, active only there; research/sink_emergence.py). Beside each batch, `--chat-share` of
it in the chat-formatted language items of the language stage (copy, recall, counting, documents;
made in data workers, item numbers continuing the model's), so that the turn markers and answers the
video questions come in stay known to a language model the next stage may freeze. The model is
Qwen2.5-VL's (the real classes); only its language model and head learn, and it is saved whole
(vision tower untouched) for `scripts.train_sharp_small --init-from ... --freeze-language`. Every
`--eval-every` steps it prints the loss, tokens a second and, per layer, the first token's share of
the last token's attention on chat-formatted language questions and on held-out documents (never
trained on). On one GPU:

    python -m scripts.pretrain_small_lm --device cuda --minutes 5 --out /tmp/lm --init-from ckpt/init
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from scripts.small_checks import attention_shares, inputs_of, language_check_rows, to_device
from scripts.small_data import (
    NONE,
    SYSTEM,
    TASKS,
    TRAIN_SEEDS_FROM,
    Batcher,
    Grammar,
    Items,
    build_processor,
    pack,
    unpack,
)
from scripts.train_sharp_small import (
    autocast_for,
    compile_layers,
    history_of,
    load_model,
    losses,
    lr_at,
    optimizer,
    save,
)
from sharp_cli.evaluate import diagnose

TRIGGERS = 8
PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"


class Language:
    """sharp-small's language as tensors on `device`, drawn a whole batch at a time."""

    def __init__(self, tokenizer, device, triggers: float):
        g = Grammar()
        self.device, self.triggers = device, triggers
        self.words = torch.tensor(tokenizer.convert_tokens_to_ids(g.words), device=device)  # word -> token id
        self.unigram = torch.tensor(g.unigram, dtype=torch.float32, device=device)
        self.next = torch.tensor(g.next, device=device)  # (words, 6)
        self.next_p = torch.tensor(g.next_p, dtype=torch.float32, device=device)  # (words, 6)
        self.topics = torch.tensor(g.topics, device=device)  # (topics, topic words)
        self.trigger_words = torch.arange(len(g.words) - TRIGGERS, len(g.words), device=device)  # the rarest 8
        self.prompt = torch.tensor(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], device=device)

    def documents(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, length) word numbers. Position by position across the batch (length steps of a
        few kernels each): the grammar's choice, then the trigger rule over it."""
        dev, g = self.device, generator
        words = torch.empty(batch, length, dtype=torch.long, device=dev)
        words[:, 0] = torch.multinomial(self.unigram, batch, replacement=True, generator=g)
        topic = torch.randint(len(self.topics), (batch,), device=dev, generator=g)
        left = torch.randint(20, 61, (batch,), device=dev, generator=g)
        rows = torch.arange(batch, device=dev)
        anyword = torch.multinomial(self.unigram, batch * length, replacement=True, generator=g).view(batch, length)
        kind = torch.multinomial(torch.tensor([0.5, 0.35, 0.15], device=dev), batch * length, replacement=True,
                                 generator=g).view(batch, length)
        trig = torch.rand(batch, length, device=dev, generator=g) < self.triggers
        which = torch.randint(TRIGGERS, (batch, length), device=dev, generator=g)
        pick = torch.randint(self.topics.shape[1], (batch, length), device=dev, generator=g)
        last = words[:, 0].clone()  # the last word that is not a trigger: the bigram's state
        for t in range(1, length):
            left -= 1
            renew = left <= 0
            topic = torch.where(renew, torch.randint(len(self.topics), (batch,), device=dev, generator=g), topic)
            left = torch.where(renew, torch.randint(20, 61, (batch,), device=dev, generator=g), left)
            successor = self.next[last, torch.multinomial(self.next_p[last], 1, generator=g).squeeze(1)]
            word = torch.where(kind[:, t] == 0, successor,
                               torch.where(kind[:, t] == 1, self.topics[topic, pick[:, t]], anyword[:, t]))
            after = words[:, t - 1] >= self.trigger_words[0]  # the previous word is a trigger: copy back
            back = (words[:, t - 1] - self.trigger_words[0]).clamp(min=0) + 2  # trigger i: i + 1 before it
            copied = words[rows, (t - back).clamp(min=0)]
            word = torch.where(after, copied, torch.where(trig[:, t], self.trigger_words[which[:, t]], word))
            words[:, t] = word
            last = torch.where(word >= self.trigger_words[0], last, word)
        return words

    def batches(self, batch: int, length: int, generator: torch.Generator, ahead: int = 16):
        """Endless (batch, length) token ids: the prompt, then a document. Drawn `ahead` batches at
        a time, so the position loop's launches are shared by that many steps."""
        while True:
            body = self.words[self.documents(batch * ahead, length - len(self.prompt), generator)]
            yield from torch.cat([self.prompt.expand(batch * ahead, -1), body], 1).split(batch)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def document_sinks(text, ids: torch.Tensor, autocast) -> dict:
    """{layer: first-token share} of the last row of held-out documents' prefixes (a quarter, half
    and all of each), head- and row-averaged: the sinks in the text this stage trains on (the chat
    questions of `attention_shares` are the format video questions come in)."""
    layers = list(range(text.config.num_hidden_layers))
    total = {layer: 0.0 for layer in layers}
    ends = (ids.shape[1] // 4, ids.shape[1] // 2, ids.shape[1])
    for end in ends:
        with diagnose.capture(text.config, layers) as rec, autocast():
            text(input_ids=ids[:, :end], use_cache=False)
        for layer in layers:
            total[layer] += float(rec.probs[layer][:, :, 0].mean()) / len(ends)
    return {layer: round(v, 4) for layer, v in total.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=1024, help="Tokens a sequence, prompt included.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100,
                   help="Linear warm-up over this many steps, counted in steps and not in the wall-clock share: a "
                        "compiled stage spends its first ten seconds compiling, and a time-based warm-up was over "
                        "by its second step (the learning rate jumped to its peak and the loss went to NaN).")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--triggers", type=float, default=0.05, help="Share of positions that are a trigger word.")
    p.add_argument("--chat-share", type=float, default=0.125, help="Chat-formatted language rows (copy, recall, "
                   "count, documents: the language stage's items) beside each batch, as a share of it; 0: none.")
    p.add_argument("--workers", type=int, default=4, help="Data processes making the chat rows.")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rope-theta", type=float, default=1e6, help="From scratch only.")
    p.add_argument("--mrope-section", default="4,6,6", help="From scratch only (see scripts.train_sharp_small).")
    p.add_argument("--compile", default="", help="torch.compile backend for the decoder layers (empty: eager).")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--check-items", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    start = time.time()
    deadline = start + a.minutes * 60 if a.minutes else math.inf
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    model, previous = load_model(a.init_from, device, hidden=a.hidden, layers=a.layers, rope_theta=a.rope_theta,
                                 mrope_section=tuple(int(n) for n in a.mrope_section.split(",")))
    model.train()
    config = model.config
    processor = build_processor(config)
    language = Language(processor.tokenizer, device, a.triggers)
    text, head = model.model.language_model, model.lm_head
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith("model.visual.")
    if a.compile:
        compile_layers(model, a.compile)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(model, a.lr, a.weight_decay)
    autocast = autocast_for(device)
    generator = torch.Generator(device).manual_seed(a.seed + (previous or {}).get("lm_tokens", 0))
    check_rows = language_check_rows(a.check_items)
    held_out = next(language.batches(4, a.length, torch.Generator(device).manual_seed(10**6), ahead=1))  # never trained
    chat_rows = max(1, round(a.batch * a.chat_share)) if a.chat_share > 0 else 0
    items_from = (previous or {}).get("items_to", 0)
    chats = iter(torch.utils.data.DataLoader(
        Items(TRAIN_SEEDS_FROM, TASKS, 1.0, 0.0, count=a.steps * chat_rows, offset=items_from),
        batch_size=chat_rows, num_workers=a.workers, collate_fn=pack)) if chat_rows else None
    batcher = Batcher(config, device=device)
    none_id = processor.tokenizer.convert_tokens_to_ids(NONE)
    skip = len(language.prompt) - 1  # the prompt is given, not learned: predictions from its last token on
    print(f"pretraining the language model of {sum(p.numel() for p in trained) / 1e6:.2f}M parameters: "
          f"batch {a.batch} x {a.length} tokens, lr {a.lr}, triggers {a.triggers}, on {device}", flush=True)
    log, step, tokens, items, checking, skipped = [], 0, 0, 0, 0.0, 0
    running = torch.zeros(2, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reserve = 20 if device.type == "cuda" else 60
    train_start = time.time()
    batches = language.batches(a.batch, a.length, generator)
    while step < a.steps:
        step += 1
        ids = next(batches)
        progress = max(step / a.steps, (time.time() - train_start) / max(1e-9, deadline - reserve - train_start))
        for group in opt.param_groups:
            group["lr"] = lr_at(min(progress, 1.0), a.lr, 0.0) * min(1.0, step / max(1, a.warmup_steps))
        with autocast():
            hidden = text(input_ids=ids, use_cache=False).last_hidden_state[:, skip:-1]
            logits = head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, skip + 1:].flatten())
        if chats is not None:  # the chat rows, through the whole model as the video stages feed it
            batch = to_device(batcher(unpack(next(chats), device)), device)
            with autocast():
                chat = losses(model(**inputs_of(batch), use_cache=False).logits, batch, config.video_token_id,
                              none_id)[0]
            loss = (1 - a.chat_share) * loss + a.chat_share * chat
            items += chat_rows
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(trained, 1.0)):  # one sync a step, ~0.3 s apart
            opt.step()
            running += torch.stack([loss.detach(), loss.new_ones(())])
        else:  # a non-finite gradient leaves the weights as they were
            skipped += 1
        tokens += ids.numel()
        out_of_time = time.time() > deadline - reserve
        last = step == a.steps or out_of_time
        if last or (a.eval_every and step % a.eval_every == 0) or step == 1:
            sync()
            mean = float(running[0] / running[1]) if running[1] > 0 else math.nan
            running.zero_()
            elapsed = time.time() - train_start - checking  # training alone, the checks' time left out
            began = time.time()
            sinks = attention_shares(model, config, check_rows, device, autocast)
            documents = document_sinks(text, held_out, autocast)
            checking += time.time() - began
            log.append({"step": step, "tokens": tokens, "loss": round(mean, 4), "skipped": skipped,
                        "lr": opt.param_groups[0]["lr"],
                        "tokens_per_second": round(tokens / elapsed), "seconds": round(time.time() - start, 1),
                        "first_token": {layer: v["first"] for layer, v in sinks.items()},
                        "first_token_documents": documents})
            print(json.dumps(log[-1]), flush=True)
        if last:
            break
    record = {"stage": "language model alone (scripts.pretrain_small_lm)", "steps": step, "lm_tokens": tokens
              + (previous or {}).get("lm_tokens", 0), "batch": a.batch, "length": a.length, "lr": a.lr,
              "warmup_steps": a.warmup_steps, "skipped_steps": skipped, "weight_decay": a.weight_decay,
              "triggers": a.triggers, "chat_share": a.chat_share,
              "compile": a.compile, "seed": a.seed, "items_from": items_from,
              "device": str(device), "torch": torch.__version__, "seconds": round(time.time() - start, 1),
              "items_to": items_from + items, "init_from": str(a.init_from) if a.init_from else None,
              "history": history_of(previous), "log": log}
    save(model, processor, a.out, record)
    print(f"saved {a.out} after {step} steps, {tokens} tokens, in {time.time() - start:.0f}s", flush=True)
    return record


if __name__ == "__main__":
    main()

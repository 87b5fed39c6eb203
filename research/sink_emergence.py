"""Do attention sinks emerge in a small Qwen2 language model on sharp-small's language, and what
makes them emerge? A CPU-sized probe for issue 24's recipe (research/sink_probe.py found none in
sharp-small r2, on language rows as on video rows).

Two languages over the same 640 words, each sequence behind the same 8-token system prompt:
  grammar   sharp-small's language stage documents (scripts/small_data.Grammar): a bigram half the
            time, a word of the current topic a third of the time, else any word. Context helps at
            every position, so a head always has something to read.
  trigger   the bigram chain alone, except that after one of 8 trigger words (10% of positions) the
            next word repeats the word before the trigger (Guo et al. 2024's Bigram-Backcopy: a head
            has work only at trigger positions and must do nothing elsewhere: the "dormant" heads that
            park attention on the first token).
  multi     as trigger, but trigger i (of 8) repeats the word i + 1 places before it: eight sparse
            jobs, each of which a head can own, active after its trigger only.
Every `--every` steps it prints, per layer, the head-averaged attention share of the first token over
the queries at positions >= 32 and the share of heads whose mean first-token share exceeds 0.3 (Gu et
al. 2024's sink ratio), with the loss.

    OMP_NUM_THREADS=1 python -m research.sink_emergence --language trigger --minutes 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from scripts.small_data import Grammar

SYSTEM_TOKENS = 8
TRIGGERS = 8


class Data:
    def __init__(self, language: str, length: int, seed: int):
        self.g, self.language, self.length = Grammar(), language, length
        self.rng = np.random.default_rng(seed)
        n = len(self.g.words)
        self.vocab = n + SYSTEM_TOKENS + TRIGGERS
        self.system = list(range(n, n + SYSTEM_TOKENS))
        self.triggers = np.arange(n + SYSTEM_TOKENS, self.vocab)

    def sequence(self) -> list[int]:
        body = self.length - SYSTEM_TOKENS
        if self.language == "grammar":
            index = {w: i for i, w in enumerate(self.g.words)}
            return self.system + [index[w] for w in self.g.text(self.rng, body)]
        out = [int(self.rng.choice(len(self.g.words), p=self.g.unigram))]
        while len(out) < body:
            if len(out) >= 2 and out[-1] in self.triggers:
                back = 2 if self.language == "trigger" else 2 + int(out[-1] - self.triggers[0])
                out.append(out[-back] if len(out) >= back else out[0])  # back-copy
            elif self.rng.random() < 0.1:
                out.append(int(self.rng.choice(self.triggers)))
            else:
                w = next(x for x in reversed(out) if x < len(self.g.words))
                out.append(int(self.g.next[w, self.rng.choice(6, p=self.g.next_p[w])]))
        return self.system + out

    def batch(self, size: int) -> torch.Tensor:
        return torch.tensor([self.sequence() for _ in range(size)])


@torch.no_grad()
def sink_stats(model, ids: torch.Tensor) -> list[dict]:
    """Per layer: first-token share (head- and query-averaged over queries >= 32), the largest
    head's, and the sink ratio (heads whose query-averaged first-token share > 0.3). Eager attention on a short batch:
    L x L here is 256 x 256 on a research probe, never in the product."""
    out = model(ids, output_attentions=True)
    stats = []
    for att in out.attentions:  # (B, H, L, L)
        first = att[:, :, 32:, 0].mean((0, 2))  # (H,)
        stats.append({"first": round(float(first.mean()), 3), "max": round(float(first.max()), 3),
                      "ratio": round(float((first > 0.3).float().mean()), 3)})
    return stats


def main(argv=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--language", choices=("grammar", "trigger", "multi"), default="trigger")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    data = Data(a.language, a.length, a.seed)
    config = Qwen2Config(vocab_size=data.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                         max_position_embeddings=a.length, tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    probe_ids = Data(a.language, a.length, 10**6).batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    start, step, log = time.time(), 0, []
    deadline = start + 60 * a.minutes
    while time.time() < deadline:
        step += 1
        ids = data.batch(a.batch)
        frac = min(1.0, step / 200)
        for group in opt.param_groups:
            group["lr"] = a.lr * frac
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == 1:
            model.config._attn_implementation = "eager"
            stats = sink_stats(model.eval(), probe_ids)
            model.config._attn_implementation = "sdpa"
            model.train()
            log.append({"step": step, "seconds": round(time.time() - start), "loss": round(float(loss), 3),
                        "layers": stats})
            print(json.dumps(log[-1]), flush=True)
    print(json.dumps({"args": vars(a), "steps": step, "tokens": step * a.batch * a.length}), flush=True)


if __name__ == "__main__":
    main()

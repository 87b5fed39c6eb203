"""How the next token is picked: greedy (the default) or sampled, plus the checkpoint's own rules.

`Sampling` is what the user asks for (--temperature, --top-p, --top-k, --seed); `Rules` adds what
the checkpoint's generation_config says that transformers' `generate(do_sample=False)` applies too:
its EOS ids and its repetition penalty. `pick` applies both to one step's logits on the device,
with fixed shapes and no host sync, so it can live inside a captured CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sharp_cli.errors import UsageError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def validate(self) -> "Sampling":
        if not (0.0 <= self.temperature < math.inf):  # `not`: NaN is refused too
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:  # torch's generators take 64 bits
            raise UsageError(f"--seed must be in [0, 2**64 - 1], got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Rules:
    eos: frozenset[int] = field(default_factory=frozenset)
    repetition_penalty: float = 1.0
    sampling: Sampling = Sampling()
    ignored: tuple[str, ...] = ()  # generation_config settings sharp does not apply (reported)


# generate(do_sample=False) settings that sharp does not apply: reported, never silently dropped.
_UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                "encoder_repetition_penalty", "exponential_decay_length_penalty", "renormalize_logits")


def rules_for(model, tokenizer=None, sampling: Sampling | None = None) -> Rules:
    """What `model.generate(do_sample=False)` applies, read from the checkpoint's generation_config:
    its EOS ids (else the model config's and the tokenizer's) and its repetition penalty."""
    gen = getattr(model, "generation_config", None)
    eos = _ids(getattr(gen, "eos_token_id", None))
    if not eos:
        for source in (model.config, getattr(model.config, "text_config", None), tokenizer):
            eos |= _ids(getattr(source, "eos_token_id", None) if source is not None else None)
    penalty = float(getattr(gen, "repetition_penalty", None) or 1.0)
    ignored = tuple(name for name in _UNSUPPORTED if getattr(gen, name, None) not in (None, 0, False, [], 1.0))
    if getattr(gen, "min_length", 0):
        ignored += ("min_length",)
    return Rules(frozenset(eos), penalty, (sampling or Sampling()).validate(), ignored)


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value}
    return set()


def pick(logits, rules: Rules, seen=None):
    """The next token, (1, 1) long, from one step's logits (1, vocab), in transformers' order:
    repetition penalty on every token seen so far (prompt included), then temperature, top-k and
    top-p, then a sample by exponential race (argmax of p / Exp(1): an exact draw, no host sync).
    Fixed shapes throughout, so it can be captured in a CUDA graph."""
    import torch

    scores = logits.float()
    if seen is not None and rules.repetition_penalty != 1.0:
        p = rules.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    s = rules.sampling
    if s.greedy:
        return scores.argmax(-1, keepdim=True)
    scores = scores / s.temperature
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= (1 - s.top_p)
        drop[..., -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)

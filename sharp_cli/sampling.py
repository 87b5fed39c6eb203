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


@dataclass
class RowRules:
    """Rules as tensors, one row per sequence of a batched decode step (batch_decode.py): each
    (B, 1), so that sequences with other temperatures, penalties or seeds share one step."""

    penalty: object  # float, 1.0: none
    greedy: object  # bool
    temperature: object  # float (1.0 on greedy rows: never divided by 0)
    top_k: object  # long, 0: no cut
    top_p: object  # float
    seed: object  # long, in [0, 2**31)

    def rows(self, start: int, end: int) -> "RowRules":
        return RowRules(*(getattr(self, name)[start:end] for name in _ROW_FIELDS))

    def set(self, row: int, rules: Rules, seed: int) -> None:
        s = rules.sampling
        self.penalty[row] = rules.repetition_penalty
        self.greedy[row] = s.greedy
        self.temperature[row] = 1.0 if s.greedy else s.temperature
        self.top_k[row] = s.top_k
        self.top_p[row] = s.top_p
        self.seed[row] = seed % 2**31


_ROW_FIELDS = ("penalty", "greedy", "temperature", "top_k", "top_p", "seed")


def row_rules(slots: int, device) -> RowRules:
    import torch

    def make(value, dtype):
        return torch.full((slots, 1), value, dtype=dtype, device=device)

    return RowRules(make(1.0, torch.float32), make(True, torch.bool), make(1.0, torch.float32),
                    make(0, torch.long), make(1.0, torch.float32), make(0, torch.long))


def pick_rows(logits, rules: RowRules, seen, counter, sample: bool):
    """The next token of each row, (B, 1) long, from logits (B, vocab): pick()'s steps with each
    row's own rules. A greedy row gets exactly pick()'s token. A sampled row draws by the same
    exponential race, with noise that is a hash of (its seed, counter, token id) instead of a
    generator's state: counter (B,) is how many tokens the row has drawn before this one, so a
    row draws the same tokens whichever rows share its steps, and no generator is captured in a
    CUDA graph. `sample`: whether any row samples (else the sampling half is not computed)."""
    import torch

    scores = logits.float()
    p = rules.penalty
    scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    best = scores.argmax(-1, keepdim=True)
    if not sample:
        return best
    scores = scores / rules.temperature
    vocab = scores.shape[-1]
    ordered = torch.sort(scores, dim=-1, descending=True).values
    k = torch.where(rules.top_k > 0, rules.top_k.clamp(max=vocab), vocab)
    scores = scores.masked_fill(scores < ordered.gather(-1, k - 1), float("-inf"))
    ascending, order = torch.sort(scores, dim=-1)
    drop = ascending.softmax(-1).cumsum(-1) <= (1 - rules.top_p)
    drop[..., -1] = False  # the most likely token always stays
    scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    drawn = (probs / exponential_noise(rules.seed.view(-1), counter, vocab)).argmax(-1, keepdim=True)
    return torch.where(rules.greedy, best, drawn)


_MASK = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (values kept below 2**32 in int64, so products never overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


def exponential_noise(seed, counter, vocab: int):
    """(B, vocab) Exp(1) draws, a pure function of (seed, counter, token id) per row."""
    import torch

    key = _mix(_mix(seed & _MASK) ^ ((counter * 0x2545F491) & _MASK))  # (B,)
    ids = torch.arange(vocab, device=seed.device)
    bits = _mix(_mix(key.view(-1, 1) ^ ((ids * 0x27D4EB2F) & _MASK)) ^ key.view(-1, 1))
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(uniform)

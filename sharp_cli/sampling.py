"""How the next token is picked: greedy (the default) or sampled, plus the checkpoint's own rules.

`Sampling` is what the user asks for (--temperature, --top-p, --top-k, --seed); `Rules` adds what
the checkpoint's generation_config says that transformers' `generate(do_sample=False)` applies too:
its EOS ids and its repetition penalty. `pick` applies both to one step's logits on the device,
with fixed shapes and no host sync, so it can live inside a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sharp_cli.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def validate(self) -> "Sampling":
        if not (self.temperature >= 0.0):
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
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

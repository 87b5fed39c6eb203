"""Every pruning choice as one documented option (docs/method.md explains each).

PruneConfig is the one place a pruning option is declared: its type, its default and its help
text (the field's metadata). The commands' options are built from these fields
(options.prune_options), so a new option is a new field here and nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sharp_cli.errors import UsageError

METHODS = ("sharp", "fastv", "evs", "random", "none")
QUERY_MODES = ("last", "text")
DEBIAS_MODES = ("divide", "divide-mean", "subtract", "none")
DEFAULT_DEBIAS = "divide"  # why divide, per head: docs/method.md, step 3
SEGMENT_ATTENTION = ("blocks", "merged")
DEFAULT_LAYER = 2  # K when --layer is not given, raised to a family's smallest supported K
SCORED = ("sharp", "fastv", "evs")  # methods that rank the visual tokens by a score (prune/rank.py)


def _opt(default, help: str, **extra):
    """A field with its command-line help next to it."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class PruneConfig:
    method: str = _opt("sharp", f"{', '.join(METHODS[:-1])} or {METHODS[-1]} (docs/method.md).")
    ratio: float = _opt(0.15, "Fraction of visual tokens kept (from layer K on; evs: from layer 0), in (0, 1].")
    layer: int | None = _opt(None, "K: the decoder layer where pruning happens (layers 0..K-1 see all tokens). "
                             "Default: 2, or the model family's smallest (3 on Qwen3-VL); evs prunes before layer 0.")
    query: str = _opt("last", "Text rows that score the video: last (token) or text (the question's tokens).")
    segment_mask: bool = _opt(True, "sharp: segment-aware causal mask in layers 0..K-1.")
    segment_frames: int | None = _opt(None, "sharp: video frames per segment (default: one model frame step).")
    segment_attention: str = _opt("blocks", "sharp: segment mask as blocks (one SDPA call per segment) or merged "
                                  "(3 flash calls a layer, merged by log-sum-exp; slower on an H200); same result.")
    debias: str = _opt(DEFAULT_DEBIAS, "sharp: positional debiasing against a black video: divide (per head and "
                       "query row, in log space), divide-mean (after averaging heads), subtract, or none.")
    debias_strength: float = _opt(1.0, "sharp, divide: exponent on the prior (0: no correction, 1: exact for a "
                                  "bias added to the logits).")
    debias_floor: float = _opt(0.1, "sharp, divide: added to the prior before dividing, as a fraction of the "
                               "uniform share 1/N (bounds how far a position the black video ignores is lifted).")
    dedup: bool = _opt(True, "sharp: skip a token when a kept, higher-ranked token at its spatial position within "
                       "--dedup-window token frames is a near duplicate; refill the budget from the skipped.")
    dedup_threshold: float = _opt(0.9, "sharp: cosine similarity above which a token is a near duplicate.")
    dedup_window: int = _opt(1, "sharp: token frames before/after searched for a kept near duplicate.")
    registers: bool = _opt(True, "sharp: skip register tokens (hidden-state norm above --register-ratio x the "
                           "median visual token's), refilling the budget.")
    register_ratio: float = _opt(10.0, "sharp: norm over the median visual token's norm above which a token is a "
                                 "register (massive activations are tens of times the median).")
    seed: int = _opt(0, "Seed of the random baseline and of the tie-break between equal scores (and of sampling "
                     "when --temperature > 0).")

    def validate(self, num_layers: int | None = None, min_layer: int = 1, why: str = "") -> "PruneConfig":
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if not (0.0 < self.ratio <= 1.0):
            raise UsageError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.query not in QUERY_MODES:
            raise UsageError(f"--query must be one of {', '.join(QUERY_MODES)}, got '{self.query}'")
        if self.debias not in DEBIAS_MODES:
            raise UsageError(f"--debias must be one of {', '.join(DEBIAS_MODES)}, got '{self.debias}'")
        if not self.debias_strength >= 0:
            raise UsageError(f"--debias-strength must be >= 0, got {self.debias_strength}")
        if not self.debias_floor > 0:
            raise UsageError(f"--debias-floor must be > 0 (a zero floor lets positions the black video never "
                             f"attends to take the top ranks), got {self.debias_floor}")
        if not (0.0 < self.dedup_threshold <= 1.0):
            raise UsageError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.dedup_window < 1:
            raise UsageError(f"--dedup-window must be >= 1, got {self.dedup_window}")
        if not self.register_ratio > 1:
            raise UsageError(f"--register-ratio must be > 1, got {self.register_ratio}")
        if self.segment_attention not in SEGMENT_ATTENTION:
            raise UsageError(f"--segment-attention must be one of {', '.join(SEGMENT_ATTENTION)}, "
                             f"got '{self.segment_attention}'")
        if self.segment_frames is not None and self.segment_frames < 1:
            raise UsageError(f"--segment-frames must be >= 1, got {self.segment_frames}")
        if self.method not in ("none", "evs") and self.layer is not None:  # None: resolved per family
            low = max(1, min_layer)
            if self.layer < low:
                reason = f" ({why})" if why else ""
                raise UsageError(f"--layer must be >= {low} for this model{reason}, got {self.layer}")
            if num_layers is not None and self.layer >= num_layers:
                raise UsageError(f"--layer must be < {num_layers} (the model's decoder layers), got {self.layer}")
        return self

    def resolved_for(self, num_layers: int | None = None, min_layer: int = 1, why: str = "") -> "PruneConfig":
        """This config for one model, K resolved (no --layer: DEFAULT_LAYER raised to the family's
        smallest K; evs: 0, whatever --layer says) and validated against the family's smallest K
        (`why` says why) and the model's depth. The result is marked resolved; the phases of a
        question (answer, prior_pass, engine, scheduler) take only such a config, so K is chosen
        once, where a command turns options into a config. A copy (dataclasses.replace) is not
        resolved: changing a field means resolving again."""
        from dataclasses import replace

        cfg = self
        if cfg.method == "evs":  # pre-LLM: the kept set is chosen before decoder layer 0
            cfg = replace(cfg, layer=0)
        elif cfg.layer is None:
            cfg = replace(cfg, layer=max(DEFAULT_LAYER, min_layer))
        else:
            cfg = replace(cfg)
        cfg.validate(num_layers, min_layer, why)
        object.__setattr__(cfg, "_resolved", True)  # not a field: options, records and equality ignore it
        return cfg

    @property
    def resolved(self) -> bool:
        """Whether resolved_for made this config (K set for one model)."""
        return vars(self).get("_resolved", False)

    @property
    def prunes(self) -> bool:
        return self.method != "none"

    @property
    def uses_segment_mask(self) -> bool:
        return self.method == "sharp" and self.segment_mask

    @property
    def uses_prior(self) -> bool:
        return self.method == "sharp" and self.debias != "none"

    def as_dict(self) -> dict:
        return asdict(self)


def field_help(name: str) -> str:
    """A field's help text, for a command that declares that one option its own way."""
    from dataclasses import fields

    return next(f.metadata["help"] for f in fields(PruneConfig) if f.name == name)


def require_resolved(cfg: PruneConfig, where: str) -> PruneConfig:
    """cfg, when resolved for the model; else an AssertionError naming what to call first. The
    phases assert instead of resolving again, so a config is followed down without climbing back."""
    if not isinstance(cfg, PruneConfig) or not cfg.resolved:
        raise AssertionError(f"{where} needs a PruneConfig resolved for the model (K chosen once, at the "
                             f"command): pass it through loaded.resolve_prune(cfg) first, got {cfg!r}")
    return cfg


def keep_count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up, at least one token."""
    return max(1, min(n, int(ratio * n + 0.5)))

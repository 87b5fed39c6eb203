"""Every pruning choice as one documented option (docs/method.md explains each)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sharp_cli.errors import UsageError

METHODS = ("sharp", "fastv", "random", "none")
QUERY_MODES = ("last", "text")
DEBIAS_MODES = ("divide", "subtract", "none")
DEFAULT_DEBIAS = "divide"  # why divide and not subtract: docs/method.md, step 3
SEGMENT_ATTENTION = ("blocks", "merged")
DEFAULT_LAYER = 2  # K when --layer is not given, raised to a family's smallest supported K


@dataclass(frozen=True)
class PruneConfig:
    method: str = "sharp"
    ratio: float = 0.15  # fraction of visual tokens kept from layer K on
    layer: int | None = None  # K: layers 0..K-1 see every token, K..L-1 only the kept ones; None = family default
    query: str = "last"  # which text rows score the visual tokens
    segment_mask: bool = True  # sharp: bidirectional attention inside a segment in layers 0..K-1
    segment_frames: int | None = None  # video frames per segment; None = one model frame step
    segment_attention: str = "blocks"  # how the segment mask is computed (same result): prune/attention.py
    debias: str = DEFAULT_DEBIAS  # sharp: remove the content-agnostic positional prior
    dedup: bool = True  # sharp: skip near-duplicates of kept tokens and register outliers
    dedup_threshold: float = 0.9  # cosine similarity above which a token is a duplicate
    dedup_window: int = 1  # token frames (before or after) searched for duplicates
    register_z: float = 8.0  # robust z-score of the hidden-state norm above which a token is a register; 0 = off
    seed: int = 0  # random baseline

    def validate(self, num_layers: int | None = None, min_layer: int = 1, why: str = "") -> "PruneConfig":
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if not (0.0 < self.ratio <= 1.0):
            raise UsageError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.query not in QUERY_MODES:
            raise UsageError(f"--query must be one of {', '.join(QUERY_MODES)}, got '{self.query}'")
        if self.debias not in DEBIAS_MODES:
            raise UsageError(f"--debias must be one of {', '.join(DEBIAS_MODES)}, got '{self.debias}'")
        if not (0.0 < self.dedup_threshold <= 1.0):
            raise UsageError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.dedup_window < 1:
            raise UsageError(f"--dedup-window must be >= 1, got {self.dedup_window}")
        if self.segment_attention not in SEGMENT_ATTENTION:
            raise UsageError(f"--segment-attention must be one of {', '.join(SEGMENT_ATTENTION)}, "
                             f"got '{self.segment_attention}'")
        if self.segment_frames is not None and self.segment_frames < 1:
            raise UsageError(f"--segment-frames must be >= 1, got {self.segment_frames}")
        if self.method != "none" and self.layer is not None:  # None: resolved per family (Adapter.validate_prune)
            low = max(1, min_layer)
            if self.layer < low:
                reason = f" ({why})" if why else ""
                raise UsageError(f"--layer must be >= {low} for this model{reason}, got {self.layer}")
            if num_layers is not None and self.layer >= num_layers:
                raise UsageError(f"--layer must be < {num_layers} (the model's decoder layers), got {self.layer}")
        return self

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


def keep_count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up, at least one token."""
    return max(1, min(n, int(ratio * n + 0.5)))

"""Baselines on the same engine and the same layer K: FastV and a seeded random subset."""

from __future__ import annotations

import torch

from sharp_cli.prune.config import keep_count


def select_fastv(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """FastV: plain top-k of the last token's attention, plain causal mask, no corrections."""
    k = keep_count(ratio, scores.numel())
    return torch.topk(scores, k).indices.sort().values


def select_random(num_visual: int, ratio: float, seed: int, device=None) -> torch.Tensor:
    """A uniform random subset, the same for the same seed and layout."""
    k = keep_count(ratio, num_visual)
    gen = torch.Generator().manual_seed(seed)
    kept = torch.randperm(num_visual, generator=gen)[:k].sort().values
    if device is not None and torch.device(device).type == "cuda":
        kept = kept.pin_memory().to(device, non_blocking=True)  # pageable copies would sync
    return kept

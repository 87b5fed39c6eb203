"""One ranking for every method that keeps the best-scored visual tokens (fastv, evs, sharp).

Exact ties are common: a small model's shallow attention can be one-hot in float32 (all but a few
scores exactly 0.0), and a video's static background gives equal similarities. Whatever breaks
those ties then decides most of the kept set, so no method may inherit an order from the token
index (argsort's stable order favours the first frames) or from a kernel (torch.topk's order on
equal values is an implementation detail that differs between CPU and CUDA). Ties are broken by a
seeded permutation of the token numbers, the same for every method and independent of content.

Nothing here reads a value back to the host: the permutation is drawn on the CPU and copied to the
device asynchronously, and the rest are device-side sorts and gathers, so the CPU keeps queueing
work while the GPU runs layers 0..K-1.
"""

from __future__ import annotations

import torch


def tie_break(n: int, seed: int, device) -> torch.Tensor:
    """A permutation of 0..n-1 drawn from a CPU generator seeded by `seed`, on `device`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    device = torch.device(device) if device is not None else perm.device
    if device.type == "cuda":
        return perm.pin_memory().to(device, non_blocking=True)  # pageable copies would sync
    return perm.to(device)


def rank(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Token numbers (N,) from the highest score to the lowest; exact ties in the order of a seeded
    permutation (the same seed gives the same order; index order never decides)."""
    perm = tie_break(scores.numel(), seed, scores.device)
    return perm[torch.argsort(scores[perm], descending=True, stable=True)]


def tie_share(scores: torch.Tensor, order: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Share of the kept tokens whose score equals the (k+1)-th ranked score, as a 0-dim float
    tensor on the scores' device (0 when every token is kept). Above a few percent, the kept set
    is partly decided by the tie-break, not by the scores."""
    k, n = kept.numel(), scores.numel()
    if k >= n:
        return scores.new_zeros((), dtype=torch.float32)
    boundary = scores.index_select(0, order[k:k + 1])  # (1,): indexing with order[k] would read it to the host
    return (scores.index_select(0, kept) == boundary).float().mean()


def top(scores: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the k best tokens, sorted by token number; their tie share)."""
    order = rank(scores, seed)
    kept = order[:k].sort().values
    return kept, tie_share(scores, order, kept)


def first_unskipped(order: torch.Tensor, skipped: torch.Tensor, k: int) -> torch.Tensor:
    """The first k tokens of `order` that are not skipped; when fewer remain, the rest come from the
    skipped ones in rank order (exactly k either way). Sorted by token number."""
    moved = order[torch.argsort(skipped[order].to(torch.int8), stable=True)]
    return moved[:k].sort().values

"""Baselines on the same engine: FastV and a seeded random subset at layer K, and EVS before layer 0.

Shapes: N visual tokens over a (T, H, W) token grid, D hidden size.
"""

from __future__ import annotations

import torch

from sharp_cli.prune import rank
from sharp_cli.prune.config import keep_count
from sharp_cli.prune.rank import tie_break

# EVS's score for the first token frame: above any 1 - cosine (at most 2), so it ranks first.
FIRST_FRAME = 3.0


def select_fastv(scores: torch.Tensor, ratio: float, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """FastV: the k best of the last token's attention (N,), plain causal mask, no corrections;
    exact ties broken by the shared seeded permutation (prune/rank.py)."""
    kept, ties = rank.top(scores, keep_count(ratio, scores.numel()), seed)
    return kept, {"tie_share": ties}


def select_random(num_visual: int, ratio: float, seed: int, device=None) -> torch.Tensor:
    """A uniform random subset, the same for the same seed and layout."""
    k = keep_count(ratio, num_visual)
    return tie_break(num_visual, seed, device)[:k].sort().values


def evs_scores(embeds_visual: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(N,) temporal novelty of each visual token, as Efficient Video Sampling scores it (arXiv
    2510.14624; vLLM's vllm/multimodal/evs.py): 1 - cosine similarity between the vision
    encoder's output embedding (N, D) of a token and that of the same spatial position in the
    previous token frame. The first token frame has no previous one and scores FIRST_FRAME."""
    t, h, w = grid
    x = embeds_visual.float().view(t, h * w, -1)
    novelty = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)  # (T-1, H*W)
    first = torch.full((1, h * w), FIRST_FRAME, dtype=novelty.dtype, device=novelty.device)
    return torch.cat([first, novelty]).reshape(-1)


def select_evs(embeds_visual: torch.Tensor, grid, ratio: float, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """EVS: keep the round(ratio * N) most novel tokens (evs_scores), ties broken by the shared
    seeded permutation. Unlike vLLM, which keeps at least a whole first frame, the budget is exactly
    round(ratio * N), as for every method here."""
    scores = evs_scores(embeds_visual, grid)
    kept, ties = rank.top(scores, keep_count(ratio, scores.numel()), seed)
    return kept, {"tie_share": ties}

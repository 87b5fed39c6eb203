"""ShaRP: shallow-layer pruning of visual tokens, one function per component.

Plain attention scores at a shallow layer are unreliable for three reasons (arXiv 2512.05385):
too little interaction between tokens, a content-agnostic positional bias, and redundancy among
high-attention tokens. Each function below fixes one of them; `select_sharp` chains them.

  1. segment-aware causal mask in layers 0..K-1      -> prune/attention.py (runs inside the model)
  2. question-to-video attention at layer K          -> question_attention()
  3. positional debiasing against a black video      -> debias() with prior_from()
  4. registers and deduplication over the ranking    -> find_registers(), find_duplicates()
  5. exact-budget selection, original order          -> rank.first_unskipped()

Shapes: H query heads, R query rows, N visual tokens, D hidden size.
"""

from __future__ import annotations

import torch

from sharp_cli.prune import rank
from sharp_cli.prune.config import PruneConfig, keep_count


def query_rows(layout, mode: str) -> torch.Tensor:
    """Sequence positions of the text rows that score the video: the last token (`last`), or the
    question's own tokens (`text`: the user's words, without <|vision_end|>, LLaVA's newline or the
    template's tail; models/base.py finds them). A layout made without that mark falls back to
    every text token after the video."""
    first, end = layout.seq_len - 1, layout.seq_len
    if mode == "text":
        first, end = layout.question or (layout.visual_end, layout.seq_len)
    return torch.arange(first, end, device=layout.indices.device)  # no host copy, no sync


def question_attention(layer, rope, hidden, position_embeddings, layout, rows) -> torch.Tensor:
    """Log attention (H, R, N), float32: entry [h, r, n] is the log of the attention that query row
    r of head h gives visual token n at layer K (the softmax runs over all L keys, causally, so a
    row's visual entries sum to its attention mass on the video, at most 1). Log space keeps the
    ranking of tokens whose attention underflows to 0.0 in float32. head_mean() gives the usual
    (N,) scores. Uses layer K's own projections and post-RoPE q and k, but only for the query rows:
    memory is R x L per head, never L x L."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    head_dim = attn.head_dim
    q = attn.q_proj(x[:, rows]).view(1, len(rows), -1, head_dim)
    k = attn.k_proj(x).view(1, length, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = rope(q, q, cos[..., rows, :], sin[..., rows, :])
    _, k = rope(k, k, cos, sin)
    heads, kv_heads = q.shape[1], k.shape[1]
    # Group query heads by their shared KV head instead of repeating K: (1, Hkv, G*R, d), head h = kv*G + g.
    q = q.reshape(1, kv_heads, (heads // kv_heads) * len(rows), head_dim)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    row_pos = rows.repeat(heads // kv_heads).view(1, 1, -1, 1)
    causal = torch.arange(length, device=x.device).view(1, 1, 1, -1) <= row_pos
    logp = logits.masked_fill(~causal, float("-inf")).log_softmax(dim=-1)
    return logp[0][..., layout.indices].reshape(heads, len(rows), -1)


def head_mean(log_attention: torch.Tensor) -> torch.Tensor:
    """(N,) attention each visual token receives, averaged over heads and query rows."""
    return log_attention.exp().mean(dim=(0, 1))


def prior_from(log_attention: torch.Tensor) -> torch.Tensor:
    """The positional prior (H, N) from a black video's log attention (H, R, N): per head, the
    query rows averaged in log space (a geometric mean: the prior question's rows differ from the
    user's in number and words), renormalised to a distribution over the visual tokens."""
    return log_attention.mean(dim=1).softmax(dim=-1)


def _per_head(prior: torch.Tensor, n: int) -> torch.Tensor:
    """(H, N) or (1, N) distributions over the visual tokens; a 1-D prior is one head for all."""
    p = prior.float().reshape(-1, n)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def calibrate(log_attention: torch.Tensor, prior: torch.Tensor, strength: float, floor: float) -> torch.Tensor:
    """(H, R, N) log distributions over the visual tokens: for each head h and query row r,
    log a_hr - strength * log(p_h + floor / N), renormalised over the visual tokens. With
    a_hr = softmax(c_r + b_h) (over all keys) and p_h = softmax(b_h) for a content-free bias b_h added
    to head h's logits, strength 1 and floor -> 0 leave softmax(c_r): the content alone (contextual
    calibration, done where the bias acts). The floor bounds the lift of a position the black video
    never attends to: at most (1 + floor) / floor times a position at the uniform share."""
    n = log_attention.shape[-1]
    p = _per_head(prior.to(log_attention.device), n)
    calibrated = log_attention - strength * torch.log(p + floor / n).unsqueeze(1)
    return calibrated.log_softmax(dim=-1)


def mass_weighted_mean(log_distributions: torch.Tensor, log_attention: torch.Tensor) -> torch.Tensor:
    """(N,) log of sum_hr m_hr q_hr / sum_hr m_hr, for distributions q (H, R, N) and m_hr the
    attention mass row r of head h puts on the video (from log_attention): each head counts as
    much as it looks at the video, as in the plain head average (a head that attends to text alone
    has a meaningless distribution over the visual tokens). Computed in log space: no underflow."""
    log_mass = torch.logsumexp(log_attention, dim=-1, keepdim=True)  # (H, R, 1)
    weighted = (log_distributions + log_mass).flatten(0, 1)
    return torch.logsumexp(weighted, dim=0) - torch.logsumexp(log_mass.flatten(), dim=0)


def debias(log_attention: torch.Tensor, prior: torch.Tensor | None, cfg: PruneConfig) -> torch.Tensor:
    """(N,) ranking scores with the positional prior removed (cfg.debias); higher is better.

    divide (default): calibrate() each head and query row, then average the calibrated
      distributions over heads and rows weighted by each row's attention mass on the video
      (mass_weighted_mean); returned as the log of that average (the same ranking, without
      float32 underflow). Strength 0 gives the plain head average (none) exactly.
    divide-mean: the head- and row-averaged scores divided by the head-averaged prior (+ f/N),
      to the power s: the same correction after averaging, exact only when every head has the
      same bias (the rule before per-head calibration).
    subtract: the head-averaged distributions subtracted (s and f unused).
    none: the head- and row-averaged attention.
    s = cfg.debias_strength, f = cfg.debias_floor (a share of the uniform 1/N)."""
    mode = cfg.debias
    if prior is None or mode == "none":
        return head_mean(log_attention)
    if mode == "divide":
        calibrated = calibrate(log_attention, prior, cfg.debias_strength, cfg.debias_floor)
        return mass_weighted_mean(calibrated, log_attention)
    n = log_attention.shape[-1]
    p_mean = _per_head(prior.to(log_attention.device), n).mean(dim=0)
    s = head_mean(log_attention)
    s = s / s.sum().clamp_min(1e-30)
    if mode == "subtract":
        return s - p_mean
    return s / (p_mean + cfg.debias_floor / n) ** cfg.debias_strength  # divide-mean


def find_registers(hidden_visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N,) bool: "register" tokens, whose hidden-state norm exceeds `ratio` x the median visual
    token's. Registers and attention sinks are massive activations, tens of times the median
    (Darcet et al. 2023; Sun et al. 2024); a scale-free test like a robust z-score would flag
    content on a uniform background, where a token a few percent brighter is "many MADs" away."""
    norms = hidden_visual.float().norm(dim=-1)
    return norms > ratio * norms.median()


def find_duplicates(hidden_visual, order, layout, threshold: float, window: int, never=None) -> torch.Tensor:
    """(N,) bool: tokens a greedy walk down the ranking `order` skips because an already kept,
    higher-ranked token at the same spatial position, at most `window` token frames away, has
    cosine similarity above `threshold` (layer-K hidden states). `never` (N,) bool: tokens that are
    skipped anyway (registers): they are never kept, so they suppress nothing.

    Whether a token is skipped depends only on the higher-ranked tokens of its own column (spatial
    position), so all columns walk at once: T steps, step r visiting each column's r-th best token.
    A token skipped for a neighbour is skipped only if that neighbour was kept: in a chain A ~ B ~ C
    with A not ~ C, ranked A > B > C, B is skipped and C kept. (The walk goes on past the budget;
    the tokens it reaches there are not kept anyway, see rank.first_unskipped.)"""
    t, h, w = layout.grid
    cols = h * w
    device = hidden_visual.device
    feats = torch.nn.functional.normalize(hidden_visual.float(), dim=-1).view(t, cols, -1)
    offsets = [d for d in range(-window, window + 1) if d != 0 and abs(d) < t]
    # similar[i, f, c]: token (f, c) and token (f + offsets[i], c) are near duplicates
    similar = torch.zeros(len(offsets), t, cols, dtype=torch.bool, device=device)
    for i, d in enumerate(offsets):
        a, b = (slice(0, t - d), slice(d, t)) if d > 0 else (slice(-d, t), slice(0, t + d))
        similar[i, a] = (feats[a] * feats[b]).sum(-1) > threshold
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=device)
    walk = position.view(t, cols).argsort(dim=0)  # (T, C): each column's token frames, best first
    never = torch.zeros(t, cols, dtype=torch.bool, device=device) if never is None else never.view(t, cols)
    pad = max([abs(d) for d in offsets], default=0)
    kept = torch.zeros(t + 2 * pad, cols, dtype=torch.bool, device=device)  # padded: no bounds checks
    skipped = torch.zeros(t, cols, dtype=torch.bool, device=device)
    column = torch.arange(cols, device=device)
    reach = min(window, t - 1)  # the offsets as a device tensor without a host copy (torch.tensor would sync)
    shift = torch.cat([torch.arange(-reach, 0, device=device), torch.arange(1, reach + 1, device=device)]).view(-1, 1)
    which = torch.arange(len(offsets), device=device).view(-1, 1)
    for r in range(t):
        frame = walk[r]  # (C,)
        if offsets:
            neighbour_kept = kept[frame + pad + shift, column]  # (len(offsets), C)
            blocked = (neighbour_kept & similar[which, frame, column]).any(dim=0)
        else:
            blocked = torch.zeros(cols, dtype=torch.bool, device=device)
        out = never[frame, column]
        skipped[frame, column] = blocked & ~out
        kept[frame + pad, column] = ~blocked & ~out
    return skipped.view(-1)


def select_sharp(log_attention, prior, hidden_visual, layout, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    """Debias, skip registers and near duplicates, keep round(ratio * N) visual tokens.
    Returns (kept token numbers, sorted; details: tie_share (0-dim), duplicates and registers (N,)
    bool). Never reads a value back to the host."""
    n = layout.num_visual
    k = keep_count(cfg.ratio, n)
    scores = debias(log_attention, prior, cfg)
    order = rank.rank(scores, cfg.seed)
    registers = find_registers(hidden_visual, cfg.register_ratio) if cfg.registers else \
        torch.zeros(n, dtype=torch.bool, device=scores.device)
    skipped = registers
    details = {"registers": registers}
    if cfg.dedup:
        duplicates = find_duplicates(hidden_visual, order, layout, cfg.dedup_threshold, cfg.dedup_window, registers)
        skipped = skipped | duplicates
        details["duplicates"] = duplicates
    kept = rank.first_unskipped(order, skipped, k)
    details["tie_share"] = rank.tie_share(scores, order, kept)
    return kept, details

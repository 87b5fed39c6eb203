"""ShaRP: shallow-layer pruning of visual tokens, one function per component.

Plain attention scores at a shallow layer are unreliable for three reasons (arXiv 2512.05385):
too little interaction between tokens, a content-agnostic positional bias, and redundancy among
high-attention tokens. Each function below fixes one of them; `select_sharp` chains them.

  1. segment-aware causal mask in layers 0..K-1      -> prune/attention.py (runs inside the model)
  2. question-to-video attention at layer K          -> question_attention()
  3. positional debiasing against a black video      -> debias()
  4. deduplication and register removal              -> find_duplicates(), find_registers()
  5. exact-budget selection, original order          -> select_with_refill()
"""

from __future__ import annotations

import torch

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
    """Attention each visual token receives from the query rows at layer K, averaged over heads and
    rows. Uses layer K's own projections and post-RoPE q and k, but only for the query rows: memory
    is rows x L per head, never L x L."""
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
    # Group query heads by their shared KV head instead of repeating K.
    q = q.reshape(1, kv_heads, (heads // kv_heads) * len(rows), head_dim)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    row_pos = rows.repeat(heads // kv_heads).view(1, 1, -1, 1)
    causal = torch.arange(length, device=x.device).view(1, 1, 1, -1) <= row_pos
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return probs[..., layout.indices].mean(dim=(0, 1, 2))


def debias(scores: torch.Tensor, prior: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Remove the positional prior: both are made distributions over the visual tokens, then the
    prior is divided out (default) or subtracted.

    Dividing is exact when the bias is a content-free term b_j added to the attention logits: the
    scores are softmax(c + b), the black video's are softmax(b), and their ratio is proportional to
    exp(c), the content alone. Subtracting leaves the prior as a factor, prior_j * (exp(c_j)/Z - 1),
    and where scores are more peaked than the prior it ranks every other token by the prior,
    reversed (docs/method.md, step 3)."""
    if prior is None or mode == "none":
        return scores
    s = scores / scores.sum().clamp_min(1e-12)
    p = prior.to(s) / prior.sum().clamp_min(1e-12)
    if mode == "subtract":
        return s - p
    # A thousandth of the uniform share keeps positions the black video never attends to (prior
    # ~0) from turning score noise into the top ranks.
    return s / (p + 1e-3 / p.numel())


def find_duplicates(hidden_visual, scores, layout, threshold: float, window: int) -> torch.Tensor:
    """A token is a duplicate when a higher-scored token at the same spatial position, at most
    `window` token frames away, has cosine similarity above `threshold` (layer-K hidden states).
    Computed for all pairs at once (no sequential walk), O(N * window) similarities."""
    t, h, w = layout.grid
    feats = torch.nn.functional.normalize(hidden_visual.float(), dim=-1).view(t, h * w, -1)
    s = scores.view(t, h * w)
    dup = torch.zeros(t, h * w, dtype=torch.bool, device=scores.device)
    for offset in range(1, min(window, t - 1) + 1):
        sim = (feats[:-offset] * feats[offset:]).sum(-1)  # frame f vs frame f + offset
        similar = sim > threshold
        later_loses = similar & (s[offset:] <= s[:-offset])
        earlier_loses = similar & (s[:-offset] < s[offset:])
        dup[offset:] |= later_loses
        dup[:-offset] |= earlier_loses
    return dup.view(-1)


def find_registers(hidden_visual, z: float) -> torch.Tensor:
    """High-norm outliers ("registers"): robust z-score of the hidden-state norm above `z`."""
    if z <= 0:
        return torch.zeros(hidden_visual.shape[0], dtype=torch.bool, device=hidden_visual.device)
    norms = hidden_visual.float().norm(dim=-1)
    median = norms.median()
    mad = (norms - median).abs().median().clamp_min(1e-6)
    return (norms - median) / (1.4826 * mad) > z


def select_with_refill(scores: torch.Tensor, flagged: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k tokens: the best unflagged ones by score, refilled from the best flagged ones if
    too few remain. Returned sorted, so kept tokens stay in their original order."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(flagged[order].to(torch.int8), stable=True)]
    return order[:k].sort().values


def select_sharp(scores, prior, hidden_visual, layout, cfg: PruneConfig) -> tuple[torch.Tensor, dict]:
    """Debias, flag duplicates and registers, and keep round(ratio * N) visual tokens."""
    k = keep_count(cfg.ratio, layout.num_visual)
    ranked = debias(scores, prior, cfg.debias)
    flagged = torch.zeros_like(ranked, dtype=torch.bool)
    stats = {}
    if cfg.dedup:
        dup = find_duplicates(hidden_visual, ranked, layout, cfg.dedup_threshold, cfg.dedup_window)
        reg = find_registers(hidden_visual, cfg.register_z)
        flagged = dup | reg
        stats = {"duplicates": dup, "registers": reg}
    return select_with_refill(ranked, flagged, k), stats

"""Pruning inside one prefill, composed from transformers' own decoder layers (no copied code).

For one prefill, the text model's layer list becomes  layers[0..K-1] + [PrunedTail(layers[K..])].
The tail scores the visual tokens with layer K's projections, keeps the chosen ones, slices the
hidden states and the shared rotary embeddings (kept tokens keep their original positions, so
decoding goes on from them) and runs layers K..L-1 on the short sequence: eagerly, or replayed
from a CUDA graph (prune/graphs.py), since the short sequence is launch-bound. Layers 0..K-1 cache
every token, layers K.. only the kept ones; the original list is back in place after prefill.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from sharp_cli.compat import incoming_cache
from sharp_cli.prune import attention
from sharp_cli.prune.baselines import select_evs, select_fastv, select_random
from sharp_cli.prune.config import PruneConfig
from sharp_cli.prune.graphs import run_layers
from sharp_cli.prune.sharp import head_mean, query_rows, question_attention, select_sharp


class StopPrefill(Exception):
    """Raised once layer K's scores exist in a score-only pass (the positional prior)."""


class PrunedTail(nn.Module):
    def __init__(self, session: "PruneSession", layers):
        super().__init__()
        self.session = session
        self.tail = list(layers)  # a plain list: not registered, so nothing is re-parented

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                **kwargs):
        s = self.session
        cache = incoming_cache(past_key_values, kwargs)
        hidden_states, position_embeddings = s.whole_sequence(hidden_states, position_embeddings)
        if hidden_states.shape[1] != s.layout.seq_len:
            raise RuntimeError("sharp's pruned tail runs in prefill only")
        if s.timer is not None:
            s.timer.start()
        kept = s.choose(self.tail[0], hidden_states, position_embeddings)
        positions = s.keep_positions_for(kept, hidden_states.device)
        cos, sin = position_embeddings
        short_pe = (cos.index_select(-2, positions), sin.index_select(-2, positions))
        short = hidden_states.index_select(1, positions)
        if s.timer is not None:
            s.timer.stop()
        if s.graphs is not None:
            return s.graphs.run(self.tail, short, short_pe, cache)
        return run_layers(self.tail, short, short_pe, cache, **kwargs)


class PruneSession:
    def __init__(self, adapter, model, encoded, cfg: PruneConfig, *, prior=None, score_only=False,
                 forced_keep=None, timer=None, graphs=None, prefix=None, keep_prefix: int = 0):
        self.adapter, self.model, self.encoded, self.cfg = adapter, model, encoded, cfg
        self.prefix = prefix  # engine.Prefix: layers 0..K-1 ran on the question's rows only
        self.keep_prefix = keep_prefix  # > 0: keep layer K's input for the first rows (prefix_hidden)
        self.prefix_hidden = None  # (hidden, cos, sin) of those rows
        self.layout = encoded.layout
        self.prior = prior
        self.score_only = score_only
        self.forced_keep = forced_keep
        self.timer = timer  # measure.Stopwatch for the selection step, or None
        self.graphs = graphs  # prune.graphs.TailGraphs, or None for eager layers
        self.log_attention = None  # (H, R, N) layer K's log attention from the query rows, kept by score-only passes
        self.scores = None  # (N,) the same averaged over heads and rows (fastv's scores)
        self.visual_hidden = None  # (N, D) layer K's input at the visual tokens, kept by score-only passes
        self.kept = None  # kept visual token numbers (0..N-1), sorted
        self.keep_positions = None  # kept sequence positions (text and visual), sorted
        self.details = {}  # score-based methods: tie_share (0-dim tensor); sharp: registers, duplicates (N,) bool
        self._stack = ExitStack()

    def __enter__(self):
        text = self.adapter.text_model(self.model)
        original = text.layers
        k = self.cfg.layer
        text.layers = nn.ModuleList([*original[:k], PrunedTail(self, original[k:])])
        self._stack.callback(setattr, text, "layers", original)
        if self.cfg.uses_segment_mask:
            frames = self.cfg.segment_frames or self.layout.frames_per_step
            runs = self.layout.segment_runs(frames)
            blocks = attention.row_blocks(self.layout.seq_len, runs)
            merged = tuple(runs) if self.cfg.segment_attention == "merged" else ()
            plan = attention.SegmentPlan(k, self.layout.seq_len, blocks, merged)
            self._stack.enter_context(attention.segment_plan(plan))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def whole_sequence(self, hidden, position_embeddings):
        """Layer K's input for every row: the cached prefix's rows put back in front of the
        question's, when layers 0..K-1 ran on the question alone."""
        cos, sin = position_embeddings
        if self.prefix is not None:
            p = self.prefix
            hidden = torch.cat([p.hidden.to(hidden.dtype), hidden], dim=1)
            cos, sin = torch.cat([p.cos.to(cos.dtype), cos], dim=-2), torch.cat([p.sin.to(sin.dtype), sin], dim=-2)
        elif self.keep_prefix:
            n = self.keep_prefix
            self.prefix_hidden = (hidden[:, :n].clone(), cos[..., :n, :].clone(), sin[..., :n, :].clone())
        return hidden, (cos, sin)

    def keep_positions_for(self, kept, device):
        # Sorting a known number of positions needs no host sync (a boolean mask + nonzero would),
        # so the CPU keeps queueing work while layers 0..K-1 still run on the GPU.
        both = torch.cat([self.layout.text_positions, self.layout.indices[kept]])
        self.keep_positions = both.sort().values
        return self.keep_positions

    def choose(self, layer, hidden, position_embeddings) -> torch.Tensor:
        """Kept visual token numbers, sorted. `layer` is decoder layer K (layer 0 for evs, whose
        `hidden` at the visual positions is then the vision encoder's output). Reads nothing back to
        the host, so the CPU keeps queueing while the GPU computes."""
        cfg, layout = self.cfg, self.layout
        if self.forced_keep is not None:
            kept = self.forced_keep.to(hidden.device)
        elif cfg.method == "random":
            kept = select_random(layout.num_visual, cfg.ratio, cfg.seed, hidden.device)
        elif cfg.method == "evs":
            embeds = hidden[0].index_select(0, layout.indices)
            kept, self.details = select_evs(embeds, layout.grid, cfg.ratio, cfg.seed)
        else:
            rows = query_rows(layout, "last" if cfg.method == "fastv" else cfg.query)
            log_attention = question_attention(layer, self.adapter.rope(layer), hidden, position_embeddings,
                                               layout, rows)
            self.scores = head_mean(log_attention)
            if self.score_only:
                self.log_attention = log_attention
                self.visual_hidden = hidden[0].index_select(0, layout.indices)
                raise StopPrefill
            if cfg.method == "fastv":
                kept, self.details = select_fastv(self.scores, cfg.ratio, cfg.seed)
            else:
                visual_hidden = hidden[0].index_select(0, layout.indices)
                kept, self.details = select_sharp(log_attention, self.prior, visual_hidden, layout, cfg)
        self.kept = kept
        return kept

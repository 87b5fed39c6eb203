"""sharp-small's training losses (scripts.train_sharp_small): next-token loss on the supervised tokens,
a per-visual-token loss (what each token shows, from the renderer: a stand-in for a vision encoder
trained on real data), and the retrieval loss on one decoder layer (the answer position's attention
mass on the tokens that show the answer), never on layers <= K+2 (issue 24); and the visual drop of
the deep layers (`--drop-visual-share`), which is no loss but rides on the same attention function."""

from __future__ import annotations

import torch

from scripts.sharp_tiny_losses import Retrieval

RETRIEVAL_FLOOR = 5  # the shallowest layer the retrieval loss may train: above K+2 for K=2 (issue 24)


class LayerRetrieval(Retrieval):
    """The answer-predicting row's attention in one decoder layer, with its gradient: the
    retrieval loss is -log of its mass on the tokens that show the answer. The capture (an
    attention function beside SDPA) is sharp-tiny's; the rows and the needle come from this
    script's batches."""

    NAME = "sharp_small_train_sdpa"

    def __init__(self, layer: int, drop_from: int = 0, drop_share: float = 0.0):
        """drop_from: deeper than `layer` (train_sharp_small checks it), whose loss reads the visual tokens."""
        super().__init__({layer})
        self.layer, self.drop_from, self.drop_share, self.blocked = layer, drop_from, drop_share, None

    def register(self, model):
        super().register(model)
        for n, layer in enumerate(model.model.language_model.layers):  # a flag per layer, as the capture's
            layer.self_attn.sharp_visual_drop = bool(self.drop_share) and n >= self.drop_from

    def arm(self, batch, video_token_id: int):
        ids = batch["input_ids"]
        self.rows = ids.shape[1] - batch["loss_mask"].sum(1) - 1  # the row that predicts the first supervised token
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        self.visible = batch["attention_mask"].bool() & (positions <= self.rows.unsqueeze(1))
        self.blocked = None
        if self.drop_share:
            self.blocked = visual_drop(ids, video_token_id, self.drop_share)

    def __call__(self, module, query, key, value, attention_mask=None, **kwargs):
        """The deep layers' text rows of the dropped video rows see no visual key (module.sharp_visual_drop);
        everything else is SDPA as before, the retrieval capture included."""
        if self.blocked is not None and getattr(module, "sharp_visual_drop", False):
            length = query.shape[2]
            if attention_mask is None:  # SDPA would have used is_causal: the causal mask, made explicit
                attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
            block = self.blocked[:, None, -length:, -key.shape[2]:]  # (B, 1, L, L)
            if attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & ~block
            else:
                attention_mask = attention_mask.masked_fill(block, torch.finfo(attention_mask.dtype).min)
        return super().__call__(module, query, key, value, attention_mask, **kwargs)

    def loss(self, batch, video_token_id: int):
        ids = batch["input_ids"]
        probs = self.probs.get(self.layer)
        self.rows, self.visible, self.probs, self.blocked = None, None, {}, None  # armed for one forward
        if probs is None or "shows_answer" not in batch:
            return ids.new_zeros((), dtype=torch.float32)
        needle = torch.zeros(ids.shape, device=ids.device)
        needle[ids == video_token_id] = batch["shows_answer"].float()
        has = (needle.sum(1) > 0).float()
        return -(torch.log((probs * needle).sum(1) + 1e-4) * has).sum() / has.sum().clamp(min=1)


def visual_drop(ids, video_token_id: int, share: float):
    """Which attention entries the deep layers lose on a random `share` of the video rows: every text
    position after the video (the question, the answer) stops seeing the visual tokens, so those
    rows must carry what they read from the video into the text by the shallower layers, as a real
    VLM's deep layers barely attend to visual tokens (FastV's finding; docs/eval.md). The visual
    rows still see each other: the per-visual-token loss is unchanged. ids (B, L) -> (B, L, L) bool,
    True where query row i may no longer see key j."""
    visual = ids == video_token_id  # (B, L)
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(visual, positions, -1).amax(1)  # (B,): the last visual position, -1 for text rows
    dropped = (torch.rand(ids.shape[0], device=ids.device) < share) & (last >= 0)
    after = positions[None, :] > last[:, None]  # (B, L): text after the video
    return (dropped[:, None, None] & after[:, :, None] & visual[:, None, :])


def losses(logits, batch, video_token_id: int, none_id: int):
    """(next-token loss on the supervised tokens, per-visual-token loss)."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    on = mask[:, 1:]
    lm = torch.nn.functional.cross_entropy(logits[:, :-1][on].float(), ids[:, 1:][on])
    if "token_labels" not in batch:
        return lm, lm.new_zeros(())
    visual = logits[ids == video_token_id].float()  # row-major: each video row's tokens in order
    labels = batch["token_labels"]
    each = torch.nn.functional.cross_entropy(visual, labels, reduction="none")
    empty = (labels == none_id).float()
    token = 0.5 * ((each * empty).sum() / empty.sum().clamp(min=1)
                   + (each * (1 - empty)).sum() / (1 - empty).sum().clamp(min=1))
    return lm, token

"""sharp-small's training losses (scripts.train_sharp_small): next-token loss on the supervised tokens,
a per-visual-token loss (what each token shows, from the renderer: a stand-in for a vision encoder
trained on real data), and the retrieval loss on one decoder layer (the answer position's attention
mass on the tokens that show the answer), never on layers <= K+2 (issue 24)."""

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

    def __init__(self, layer: int):
        super().__init__({layer})
        self.layer = layer

    def arm(self, batch, video_token_id: int):
        ids = batch["input_ids"]
        self.rows = ids.shape[1] - batch["loss_mask"].sum(1) - 1  # the row that predicts the first supervised token
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        self.visible = batch["attention_mask"].bool() & (positions <= self.rows.unsqueeze(1))

    def loss(self, batch, video_token_id: int):
        ids = batch["input_ids"]
        probs = self.probs.get(self.layer)
        self.rows, self.visible, self.probs = None, None, {}
        if probs is None or "shows_answer" not in batch:
            return ids.new_zeros((), dtype=torch.float32)
        needle = torch.zeros(ids.shape, device=ids.device)
        needle[ids == video_token_id] = batch["shows_answer"].float()
        has = (needle.sum(1) > 0).float()
        return -(torch.log((probs * needle).sum(1) + 1e-4) * has).sum() / has.sum().clamp(min=1)


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

"""sharp-tiny's losses, for scripts.train_sharp_tiny: the answer and token losses from the logits,
and the retrieval loss from the attention of the answer's position (Retrieval, an attention
function registered with transformers; scripts.train_sharp_small builds on it)."""

from __future__ import annotations

import torch


def losses(logits, batch, video_token_id: int, none_id: int):
    """(answer loss, token loss). The answer loss is on the last `answer_tokens` of each row (the
    batch is left-padded), each predicted from the position before. The token loss asks each visual
    token for what it shows, needle tokens and `none` tokens weighted half each (needles are few)."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    on = torch.arange(length, device=ids.device).unsqueeze(0) >= (length - batch["answer_tokens"]).unsqueeze(1)
    answer = torch.nn.functional.cross_entropy(logits[:, :-1][on[:, 1:]].float(), ids[:, 1:][on[:, 1:]])
    if "token_labels" not in batch:
        return answer, answer.new_zeros(())
    visual = logits[ids == video_token_id].float()  # row-major: each row's tokens in order
    labels = batch["token_labels"].reshape(-1)
    if visual.shape[0] != labels.numel():
        raise ValueError(f"{visual.shape[0]} visual tokens but {labels.numel()} token labels")
    each = torch.nn.functional.cross_entropy(visual, labels, reduction="none")
    empty = (labels == none_id).float()  # means by sums and counts: no host sync per step
    token = 0.5 * ((each * empty).sum() / empty.sum().clamp(min=1)
                   + (each * (1 - empty)).sum() / (1 - empty).sum().clamp(min=1))
    return answer, token


class Retrieval:
    """Attention of the answer's position in some decoder layers, kept with its gradient, for the
    retrieval loss: its mass on the visual tokens that show the answer. By default only the last
    layer; the shallow ones, where pruning scores tokens, then learn what they learn (docs/eval.md:
    teaching layer 1 too did not make pruning at K=2 work on the shipped size). Registered with
    transformers' AttentionInterface (with the SDPA mask function, so left padding stays masked); SDPA computes
    the layer's output as usual."""

    NAME = "sharp_tiny_train_sdpa"

    def __init__(self, layers: set[int]):
        self.layers, self.rows, self.visible, self.probs = layers, None, None, {}

    def register(self, model):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.model.language_model.config._attn_implementation = self.NAME
        # a flag on each attention module, the same False on every layer not captured: a compiled
        # layer that read layer_idx instead would be guarded on it, one recompile a layer, and past
        # torch's limit of 8 the rest ran eagerly (research/results/h100-sharp-small-p1.log)
        for n, layer in enumerate(model.model.language_model.layers):
            layer.self_attn.sharp_retrieval_capture = n in self.layers

    def __call__(self, module, query, key, value, attention_mask=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        out = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
        if self.rows is not None and getattr(module, "sharp_retrieval_capture", False):
            layer = module.layer_idx
            q = query[torch.arange(query.shape[0], device=query.device), :, self.rows]  # (B, H, d)
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, L, d)
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * scale
            self.probs[layer] = scores.masked_fill(~self.visible.unsqueeze(1), float("-inf")).softmax(-1).mean(1)
        return out

    def arm(self, batch):
        """Before a forward: the row that predicts the first answer token, and what it may see."""
        ids = batch["input_ids"]
        self.rows = ids.shape[1] - batch["answer_tokens"] - 1
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        self.visible = batch["attention_mask"].bool() & (positions <= self.rows.unsqueeze(1))

    def loss(self, batch, video_token_id: int):
        """-log of the attention mass on the tokens that show the answer, over the rows that have some,
        averaged over the layers."""
        ids = batch["input_ids"]
        needle = torch.zeros(ids.shape, device=ids.device)
        needle[ids == video_token_id] = batch["answer_tokens_shown"].reshape(-1).float()
        has = (needle.sum(1) > 0).float()
        losses = [-(torch.log((probs * needle).sum(1) + 1e-4) * has).sum() / has.sum().clamp(min=1)
                  for probs in self.probs.values()]
        self.rows, self.visible, self.probs = None, None, {}
        return torch.stack(losses).mean()

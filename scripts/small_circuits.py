"""What sharp-small's training keeps fixed (scripts.train_sharp_small): the language model under
`--freeze-language`, the shallow layers' query and key under `--freeze-qk-layers`, and the circuits
scripts.plant_priors built (sinks, recency) under `--hold-planted`."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def freeze_language(model) -> None:
    """Only the vision tower and its merger learn; the language model (embeddings, decoder, head)
    keeps what the language stage made, as a real VLM's first stage trains the projector alone
    (LLaVA): its heads' habits, attention sinks among them, are then the language model's own."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("model.visual.")


def freeze_query_key(model, layers: list[int]) -> None:
    """The query and key projections of `layers` (weights and biases) stop learning: those layers
    keep where they look as --init-from has it (a language-trained model's broad shallow attention)
    while their values, outputs and MLPs still learn. Why: every run that trained on the video tasks
    narrowed layers 1-2 (entropy 0.66 -> 0.49, top-1 0.14 -> 0.25 from r2 to p1), where a real VLM's
    shallow attention stays broad and the task's retrieval is done deeper."""
    for n in layers:
        attention = model.model.language_model.layers[n].self_attn
        for proj in (attention.q_proj, attention.k_proj):
            for param in proj.parameters():
                param.requires_grad = False


def planted_before(folder: Path) -> dict:
    """The circuits scripts.plant_priors built into a checkpoint or one it continues, from its
    training.json: {"planted_sinks": {...}, "planted_recency": [{...}, ...]} (empty if none)."""
    path = Path(folder) / "training.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    found: dict = {}
    for entry in [record] + record.get("history", [])[::-1]:  # newest first: a later plant wins
        for kind in ("planted_sinks", "planted_recency"):
            if kind in entry and kind not in found:
                found[kind] = entry[kind]
    if isinstance(found.get("planted_recency"), dict):  # p1's record (an older plant_priors): one dict
        found["planted_recency"] = [found["planted_recency"]]
    return found


def held_entries(model, planted: dict) -> list:
    """[(parameter, flat indices, values)]: the planted circuits' entries as they are now, for
    --hold-planted to put back after every optimizer step (AdamW's weight decay and the gradients move
    them). Indices, not masks: a boolean-mask write asks the GPU how many entries are set (a sync)."""
    lm, tc = model.model.language_model, model.config.text_config
    hd, heads, kv = tc.hidden_size // tc.num_attention_heads, tc.num_attention_heads, tc.num_key_value_heads
    masks: dict = {}

    def mark(param, index):
        masks.setdefault(param, torch.zeros_like(param, dtype=torch.bool))[index] = True

    def mark_pair(att, pair):
        for proj, count in ((att.q_proj, heads), (att.k_proj, kv)):
            rows = [g * hd + d for g in range(count) for d in (pair, pair + hd // 2)]
            mark(proj.weight, rows)
            mark(proj.bias, rows)

    sinks = planted.get("planted_sinks")
    if sinks:
        j = sinks["dimension"]
        mark(lm.embed_tokens.weight, (slice(None), j))
        mark(model.model.visual.merger.mlp[-1].weight, j)
        for n, layer in enumerate(lm.layers):
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                mark(proj.weight, j)
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.k_proj,
                         layer.self_attn.v_proj):
                mark(proj.weight, (slice(None), j))
            if n >= sinks["from_layer"]:
                mark_pair(layer.self_attn, sinks["rotary_pair"])
    for recency in planted.get("planted_recency", []):
        for n in recency["layers"]:
            mark_pair(lm.layers[n].self_attn, recency["rotary_pair"])
    held = []
    for param, mask in masks.items():
        index = mask.reshape(-1).nonzero().squeeze(1)  # once, at the start
        held.append((param, index, param.detach().reshape(-1)[index].clone()))
    return held

"""The decode phase: tokens after the first, from the prefill cache."""

from __future__ import annotations

import torch

from sharp_cli import measure
from sharp_cli.compat import cache_kwargs
from sharp_cli.engine import Prefill
from sharp_cli.loading import Loaded


@torch.inference_mode()
def decode(loaded: Loaded, encoded, state: Prefill, max_new_tokens: int, *, on_token=None,
           should_stop=None) -> tuple[list[int], float]:
    """Greedy decoding from the prefill cache; stops at EOS, or when should_stop() says so.
    on_token(id) sees every token as it comes. Returns (token ids, seconds)."""
    text = loaded.adapter.text_model(loaded.model)
    head = loaded.adapter.lm_head(loaded.model)
    eos = eos_ids(loaded)
    token = state.next_token
    tokens = [int(token)]
    if on_token is not None:
        on_token(tokens[-1])
    watch = measure.Stopwatch(loaded.device)
    with watch:
        for step in range(max_new_tokens - 1):
            if tokens[-1] in eos or (should_stop is not None and should_stop()):
                break
            embeds = loaded.adapter.embed(loaded.model, token)
            out = text(inputs_embeds=embeds, position_ids=loaded.adapter.decode_position(encoded, step),
                       use_cache=True, **cache_kwargs(text, state.cache))
            token = head(out.last_hidden_state[:, -1:]).argmax(-1)
            tokens.append(int(token))
            if on_token is not None:
                on_token(tokens[-1])
    return tokens, watch.seconds


def eos_ids(loaded: Loaded) -> set[int]:
    ids = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config,
                   getattr(loaded.model.config, "text_config", None), loaded.processor.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids

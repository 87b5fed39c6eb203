"""Differences between the transformers releases sharp supports (5.17 through the newest; pip installs
5.18 or later, where Qwen2.5-VL's video time positions no longer truncate seconds per frame pair to an
integer: the GPU image's 5.17 runs, but gives sharp-tiny positions it was not trained on)."""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_name(cls) -> str:
    # 5.24 renamed the cache argument of models and decoder layers from `past_key_values` to
    # `cache`; the old name still works but warns, and a layer given both takes `cache`.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{name: cache} under the name `module.forward` takes its KV cache by."""
    return {_cache_name(type(module)): cache}


def incoming_cache(past_key_values, kwargs: dict):
    """The cache a parent model handed to a layer, under either name (removed from kwargs)."""
    cache = kwargs.pop("cache", None)
    return cache if cache is not None else past_key_values

"""Model families sharp supports, one adapter each."""

from __future__ import annotations

from sharp_cli.errors import ModelError
from sharp_cli.models.base import Adapter, Encoded, VisualLayout
from sharp_cli.models.llava import LlavaOnevisionAdapter
from sharp_cli.models.qwen import Qwen2VLAdapter, QwenVLAdapter
from sharp_cli.models.qwen3 import Qwen3VLAdapter

ADAPTERS: list[Adapter] = [QwenVLAdapter(), Qwen2VLAdapter(), Qwen3VLAdapter(), LlavaOnevisionAdapter()]


def supported_families() -> str:
    return ", ".join(f"{a.family} (e.g. {a.hub_examples[0]})" for a in ADAPTERS)


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ModelError(
        f"model type '{model_type}' is not a supported video LLM; supported: {supported_families()}"
    )


__all__ = ["ADAPTERS", "Adapter", "Encoded", "VisualLayout", "adapter_for", "supported_families"]

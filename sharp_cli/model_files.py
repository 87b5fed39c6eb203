"""What a model's own files say, read as plain JSON before torch and transformers are imported.

Enough to resolve K and refuse a `--layer` beyond the model's depth in about a second, where the
full check (loading.check_prune_config, through transformers' config classes) comes after several
seconds of imports. Where the files are not on this machine yet (a hub id not downloaded), nothing
is said here and the full check resolves K.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARP_TINY = Path(__file__).resolve().parent / "models" / "sharp_tiny"
SHARP_SMALL = Path(__file__).resolve().parent / "models" / "sharp_small"
# The test models shipped in the package (-m sharp-tiny, -m sharp-small): folder, and what makes it.
SHIPPED = {"sharp-tiny": (SHARP_TINY, "python -m scripts.train_sharp_tiny"),
           "sharp-small": (SHARP_SMALL, "python -m scripts.train_sharp_small")}


def folder(name: str, random_weights: bool = False) -> Path | None:
    """The folder holding `name`'s config.json on this machine, or None."""
    if random_weights:
        from sharp_cli.models.random_init import packaged_configs

        shipped = packaged_configs().get(name)
        if shipped is not None:
            return shipped
    if name in SHIPPED:
        return SHIPPED[name][0]
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if random_weights:
        return None
    from sharp_cli import hub

    cached = hub.cached_folder(name) if hub.is_hub_id(name) else None
    return Path(cached) if cached else None


def depth(config: dict) -> int | None:
    """Decoder layers of the text model, as transformers reads them (text_config first)."""
    text = config.get("text_config")
    value = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if value is None:
        value = config.get("num_hidden_layers")
    return value if isinstance(value, int) and value > 0 else None


def check_layer(name: str, cfg, random_weights: bool = False):
    """cfg resolved for the model (PruneConfig.resolved_for through its family's adapter) from its
    config.json alone: a UsageError (one line) when --layer does not fit. cfg unchanged where that
    file is not at hand or is not a family sharp knows (loading.check_prune_config resolves it)."""
    from sharp_cli.models import ADAPTERS

    where = folder(name, random_weights)
    try:
        config = json.loads((where / "config.json").read_text(encoding="utf-8")) if where else None
    except (OSError, ValueError):
        return cfg
    if not isinstance(config, dict):
        return cfg
    adapter = next((a for a in ADAPTERS if config.get("model_type") in a.model_types), None)
    layers = depth(config)
    if adapter is None or layers is None:
        return cfg
    return adapter.validate_prune(cfg, layers)

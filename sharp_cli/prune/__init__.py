"""Visual-token pruning: ShaRP (sharp.py), baselines (baselines.py), and the hooks that apply them."""

from sharp_cli.prune.config import DEBIAS_MODES, METHODS, QUERY_MODES, PruneConfig, keep_count

__all__ = ["DEBIAS_MODES", "METHODS", "QUERY_MODES", "PruneConfig", "keep_count"]

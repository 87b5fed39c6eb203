"""sharp: ask questions about videos with a video LLM, made fast by ShaRP visual-token pruning."""

__version__ = "0.1.0"

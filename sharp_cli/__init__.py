"""sharp: ask questions about videos with a video LLM, made fast by ShaRP visual-token pruning."""

__version__ = "0.1.0"
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"  # what -m means when not given (every command; loading.DEFAULT_MODEL)

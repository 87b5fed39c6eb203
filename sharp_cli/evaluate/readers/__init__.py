"""Readers of the released benchmark layouts, one module per benchmark.

Each module has `is_root(folder)` (the folder is that benchmark's download, as its users have it)
and `read(path, video_dir, category_field) -> Dataset`. formats.py picks one and checks the result.
docs/eval.md shows each layout and the command that evaluates it.
"""

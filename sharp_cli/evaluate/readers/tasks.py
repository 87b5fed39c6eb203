"""Task-per-file benchmarks (MVBench, MLVU): the task files under a root, its json/ folder, or one file."""

from __future__ import annotations

from pathlib import Path

from sharp_cli.errors import UsageError


def task_files(path: Path) -> tuple[list[Path], Path]:
    """(task .json files, benchmark root) from the root, its json/ folder or one task file."""
    if path.is_file():
        return [path], path.parent.parent if path.parent.name == "json" else path.parent
    json_dir = path / "json" if (path / "json").is_dir() else path
    files = sorted(p for p in json_dir.glob("*.json") if p.is_file())
    if not files:
        raise UsageError(f"no task .json files in {json_dir}")
    return files, json_dir.parent if json_dir.name == "json" else json_dir

"""JSON-lines results files that survive interruption: append and flush one line per result, and
on the next run cut off the unfinished last line an interrupted run left (eval and batch share it)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def dumps(record: dict) -> str:
    return json.dumps(record, default=_plain)


def _plain(value):
    if hasattr(value, "tolist"):  # numpy and torch scalars or arrays
        return value.tolist()
    return str(value)


def open_for_append(path: Path):
    """Append mode, after cutting off an unfinished last line left by an interrupted run."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            os.truncate(path, end)
    return open(path, "a", encoding="utf-8")


def append(handle, record: dict) -> None:
    handle.write(dumps(record) + "\n")
    handle.flush()


def complete_records(path: Path) -> list[dict]:
    """The JSON objects on the complete lines of a file; an unfinished last line is left out."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for raw in data.split(b"\n")[:-1]:
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records

"""JSON-lines results files that survive interruption: append and flush one line per result, and
on the next run cut off the unfinished last line an interrupted run left (eval and batch share it).

Only a results file of ours is appended to: its JSON lines all our records (a `sharp batch` answer
or error, a `sharp eval` cell), at most an unfinished last line that begins like one, and lines
that are not JSON at all only among records of ours (damage, which readers skip). Anything else
named by --output (a questions file, a log, a JSON document) is refused with one line, and nothing
in it is cut.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sharp_cli.errors import UsageError

# The first key of every record written here: {"id": ...} (batch), {"item": ...} (eval).
_RECORD_START = re.compile(rb'^\{"(id|item)": ')
MAX_UNFINISHED_BYTES = 16 * 2**20  # a half-written record is one record: never more than this


def dumps(record: dict) -> str:
    return json.dumps(record, default=_plain)


def _plain(value):
    if hasattr(value, "tolist"):  # numpy and torch scalars or arrays
        return value.tolist()
    return str(value)


def is_batch_record(record) -> bool:
    """A `sharp batch` line: an answer (the ask --json object) or an error, with the item's id."""
    return isinstance(record, dict) and "id" in record and (
        set(record) == {"id", "error"} or {"answer", "method", "frames", "visual_tokens_total"} <= record.keys())


def is_eval_record(record) -> bool:
    """A `sharp eval` line: one (item, method, ratio) cell (evaluate/runner.py reads these)."""
    return isinstance(record, dict) and {"item", "method", "ratio"} <= record.keys()


def looks_ours(record) -> bool:
    return is_batch_record(record) or is_eval_record(record)


def check_ours(path: Path, is_ours=looks_ours) -> int:
    """Refuse (UsageError, one line) a file that is not a results file of ours; returns the length
    of its complete lines (what open_for_append keeps). A missing or empty file is fine."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        raise UsageError(f"--output '{path}' is a folder") from None
    except OSError as exc:
        raise UsageError(f"cannot read --output '{path}': {exc.strerror or exc}") from None
    end = data.rfind(b"\n") + 1
    refuse = (f"{path} is not a results file of sharp's ({{}}); it is left as it is: pass another --output, "
              "or remove that file to start over")
    ours, damaged = 0, None
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            damaged = damaged or number
            continue
        if not is_ours(record):
            raise UsageError(refuse.format(f"line {number} is not one of its records"))
        ours += 1
    if damaged and not ours:
        raise UsageError(refuse.format(f"line {damaged} is not JSON"))
    tail = data[end:]
    if tail:  # an unfinished last line: an interrupted run's, if it begins like one of our records
        number = data[:end].count(b"\n") + 1
        if len(tail) > MAX_UNFINISHED_BYTES or not _RECORD_START.match(tail):
            raise UsageError(refuse.format(f"its last line, {number}, is not one of its records"))
    return end


def open_for_append(path: Path, is_ours=looks_ours):
    """Append mode, after cutting off an unfinished last line left by an interrupted run; a file
    that is not a results file of ours is refused (check_ours) and left untouched."""
    path = Path(path)
    end = check_ours(path, is_ours)
    if path.exists() and path.stat().st_size != end:
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
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records

"""The Item every reader returns, and the checks and lookups the readers share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sharp_cli.errors import SharpError
from sharp_cli.evaluate.letters import LETTERS

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass
class Item:
    id: str
    video: str  # absolute path
    question: str
    options: list[str]  # empty: an open question, asked as it is (agreement only)
    answer: str | None  # letter; None: no gold answer (counts for agreement, not accuracy)
    category: str | None = None
    needle_boxes: list | None = None  # [frame, x0, y0, x1, y1] boxes showing the answer (needles.py)


@dataclass
class Dataset:
    items: list[Item]
    format: str
    name: str  # short name of the data, for the default results file
    notes: list[str] = field(default_factory=list)


def answer_letter(answer, options: list[str], where: str) -> str:
    """A letter ("B" or "b"), the option's text, or a 0-based index -> the answer letter."""
    if isinstance(answer, bool):
        raise SharpError(f"{where}: answer must be a letter, the option text or an index, got {answer!r}")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return LETTERS[answer]
        raise SharpError(f"{where}: answer index {answer} is out of range for {len(options)} options")
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(options)] and text not in options:
        return text.upper()
    for same in (lambda o: o.strip() == text, lambda o: o.strip().lower() == text.lower()):
        matches = [i for i, o in enumerate(options) if same(o)]
        if len(matches) == 1:
            return LETTERS[matches[0]]
    raise SharpError(f"{where}: answer {answer!r} is neither an option letter nor one of the options")


def make_item(item_id, video: Path, question, options: list[str], answer: str | None, category, where: str,
              needle_boxes=None) -> Item:
    if options and not 2 <= len(options) <= len(LETTERS):
        raise SharpError(f"{where}: needs 2 to {len(LETTERS)} options, got {len(options)}")
    if not str(question).strip():
        raise SharpError(f"{where}: the question is empty")
    return Item(str(item_id), str(Path(video).absolute()), str(question).strip(), [str(o) for o in options],
                answer, None if category is None else str(category), needle_boxes)


def field_of(rec, key: str, where: str, kind=None):
    if not isinstance(rec, dict):
        raise SharpError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        raise SharpError(f"{where}: no '{key}' field")
    value = rec[key]
    if hasattr(value, "tolist"):  # parquet list columns come back as arrays
        value = value.tolist()
    if kind is not None and not isinstance(value, kind):
        raise SharpError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def read_records(path: Path) -> list:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SharpError(f"reading {path.name} needs pyarrow (pip install pyarrow), "
                             "or save the same records as JSON lines") from None
        return pq.read_table(path).to_pylist()
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SharpError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, list):
        raise SharpError(f"{path}: expected a JSON list of questions")
    return data


def first_dir(root: Path, names) -> Path:
    return next((root / n for n in names if (root / n).is_dir()), root / names[0])


def find_video(folder: Path, stem: str) -> Path:
    for suffix in VIDEO_SUFFIXES:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    return folder / f"{stem}.mp4"

"""The Item every reader returns, and the checks and lookups the readers share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sharp_cli.errors import SharpError
from sharp_cli.letters import LETTERS

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
# The fields of an item in our own format: what formats._read_sharp reads (id, video, question, options,
# answer, category, needle_boxes), then what `sharp synth` adds about its clip. `sharp batch` reads the
# same files: it asks video, question and options and ignores the rest (batch.parse_item).
ITEM_FIELDS = ("id", "video", "question", "options", "answer", "category", "needle_boxes",
               "needle_frames", "needle_part", "camera", "scene_starts")


@dataclass
class Item:
    id: str
    video: str  # absolute path
    question: str
    options: list[str]  # empty: an open question, asked as it is (agreement only)
    answer: str | None  # letter; None: no gold answer (counts for agreement, not accuracy)
    category: str | None = None  # what accuracy is broken down by (--category-field)
    needle_boxes: list | None = None  # [frame, x0, y0, x1, y1] boxes showing the answer (needles.py)
    group: str | None = None  # the benchmark's own task, whatever --category-field: its headline averages over them
    prompt: str | None = None  # the full prompt, set by prompts.apply; None: the default layout (records.prompt_for)


@dataclass
class Dataset:
    items: list[Item]
    format: str
    name: str  # short name of the data, for the default results file
    notes: list[str] = field(default_factory=list)
    video_hint: str = "pass --video-dir"  # how to point at the videos, said when some are missing


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
              needle_boxes=None, group=None) -> Item:
    if options and not 2 <= len(options) <= len(LETTERS):
        raise SharpError(f"{where}: needs 2 to {len(LETTERS)} options, got {len(options)}")
    if not str(question).strip():
        raise SharpError(f"{where}: the question is empty")
    return Item(str(item_id), str(Path(video).absolute()), str(question).strip(), [str(o) for o in options],
                answer, None if category is None else str(category), needle_boxes,
                None if group is None else str(group))


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


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SharpError(f"reading {path.name} needs pyarrow (pip install pyarrow, or sharp-cli[benchmarks]), "
                         "or save the same records as JSON lines") from None
    return pq


def read_records(path: Path) -> list:
    if path.suffix == ".parquet":
        pq = _parquet(path)
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise SharpError(f"cannot read {path}: {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return _json_lines(path, text)
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SharpError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise SharpError(f"cannot read {path}: it is not JSON this program reads (nested too deeply)") from None
    if not isinstance(data, list):
        raise SharpError(f"{path}: expected a JSON list of questions")
    return data


def _json_lines(path: Path, text: str) -> list:
    """The records of a JSON-lines file, blank lines skipped; a bad line is named by its number in the
    file, as `sharp batch` names it."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # numbered as an editor (and `sharp batch`) counts
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SharpError(f"cannot read {path}: line {number} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise SharpError(f"cannot read {path}: line {number} is not JSON this program reads "
                             "(nested too deeply)") from None
    return records


def columns(path: Path) -> set[str]:
    """The field names of an annotation file: a parquet file's columns, or the first JSON record's keys."""
    if path.suffix == ".parquet":
        try:
            return set(_parquet(path).read_schema(path).names)
        except (OSError, ValueError) as exc:
            raise SharpError(f"cannot read {path}: {exc}") from None
    records = read_records(path)
    return set(records[0]) if records and isinstance(records[0], dict) else set()


def find_video(folders, name: str) -> Path:
    """The first of folder/name (or name with another video suffix) that is a file, over the folders in order;
    when none is, the path in the first folder that exists (what the missing-videos message shows)."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in {s.lower() for s in VIDEO_SUFFIXES} else name
    names = list(dict.fromkeys([name, *(stem + s for s in VIDEO_SUFFIXES)]))
    for folder in folders:
        for candidate in names:
            if (folder / candidate).is_file():
                return folder / candidate
    where = next((f for f in folders if f.is_dir()), folders[0])
    return where / (name if Path(name).suffix else f"{name}.mp4")

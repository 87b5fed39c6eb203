"""MLVU's dev set as released (`MLVU/MVLU`) and as lmms-eval reads it (`sy1998/MLVU_dev`).

Official release: `MLVU/json/<n>_<task>.json`, lists of {video, duration, question, candidates,
answer (a candidate's text), question_type}, and videos in `MLVU/video/<n>_<task>/<video>`; the
open-ended tasks (sub-scene captioning, summaries) have no candidates and are skipped with a note.
lmms-eval's `mlvu_dev` task: `mlvu/test-00000-of-00001.parquet` of {video_name, duration, question
(with the options as "(A) ..." lines), candidates, answer (a letter), task_type, question_id}, and the
video zips unzipped next to `mlvu/` (lmms-eval's cache folder `mlvu`); the videos are looked for there
and one folder down. `sy1998/MLVU_Test` (`mlvu_test/`) has the same columns.

The task type is the item's group: MLVU's headline, M-Avg, is the mean of the per-task-type accuracies.
"""

from __future__ import annotations

import re
from pathlib import Path

from sharp_cli.evaluate.items import Dataset, answer_letter, field_of, find_video, make_item, read_records
from sharp_cli.evaluate.readers.tasks import task_files

LMMS_FOLDERS = ("mlvu", "mlvu_test")  # lmms-eval's cache folders: sy1998/MLVU_dev and sy1998/MLVU_Test
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")
HINT = "pass --video-dir (the folder the MLVU videos were unzipped into)"


def is_root(folder: Path) -> bool:
    if any(p for name in LMMS_FOLDERS for p in (folder / name).glob("*.parquet")):
        return True
    for json_dir in (folder / "json", folder, folder / "MLVU" / "json"):
        if any(p.stem.split("_")[0].isdigit() for p in json_dir.glob("*.json")):
            return True
    return False


def read(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    lmms = _lmms_files(path)
    if lmms:
        return _read_lmms(lmms, video_dir, category_field)
    if path.is_dir() and not (path / "json").is_dir() and (path / "MLVU" / "json").is_dir():
        path = path / "MLVU"  # the download's outer folder
    files, root = task_files(path)
    vroot = video_dir or root / "video"
    items, skipped = [], 0
    for file in files:
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            if "candidates" not in rec:  # generation tasks (sub-scene captioning, summaries)
                skipped += 1
                continue
            options = [str(c) for c in field_of(rec, "candidates", where, list)]
            task = rec.get("question_type", file.stem)
            name = str(field_of(rec, "video", where))
            items.append(make_item(
                rec.get("question_id", f"{file.stem}-{i}"), find_video([vroot / file.stem, vroot], name),
                field_of(rec, "question", where), options, _answer(rec, options, where),
                rec.get(category_field or "question_type", file.stem), where, group=task))
    notes = [f"skipped {skipped} MLVU questions without candidates (open-ended tasks)"] if skipped else []
    return Dataset(items, "mlvu", "mlvu", notes, video_hint=HINT)


def _lmms_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" or "video_name" in _first(path) else []
    for folder in (*(path / name for name in LMMS_FOLDERS), path):
        files = sorted(folder.glob("*.parquet"))
        if files:
            return files
    return []


def _first(path: Path) -> dict:
    records = read_records(path) if path.suffix in (".json", ".jsonl") else []
    return records[0] if records and isinstance(records[0], dict) else {}


def _read_lmms(files: list[Path], video_dir: Path | None, category_field: str | None) -> Dataset:
    base = files[0].parent
    root = base.parent if base.name in LMMS_FOLDERS else base
    top = video_dir or root  # the zips may unzip into a folder of their own: one level down too
    folders = [top, *sorted(p for p in top.iterdir() if p.is_dir() and p.name not in LMMS_FOLDERS)]
    items = []
    for file in files:
        records = read_records(file)
        ids = [f"{r.get('task_type')}-{r.get('question_id')}" if isinstance(r, dict) else "" for r in records]
        positional = len(set(ids)) != len(ids) or not all(isinstance(r, dict) and "question_id" in r for r in records)
        for i, rec in enumerate(records):
            where = f"{file.name} item {i}"
            question, listed = _split_question(str(field_of(rec, "question", where)))
            options = [str(c) for c in rec["candidates"]] if rec.get("candidates") is not None else listed
            if hasattr(options, "tolist"):
                options = options.tolist()
            task = rec.get("task_type")
            items.append(make_item(
                f"{file.stem}-{i}" if positional else ids[i],
                find_video(folders, str(field_of(rec, "video_name", where))),
                question, options, _answer(rec, options, where), rec.get(category_field or "task_type"), where,
                group=task))
    return Dataset(items, "mlvu", "mlvu", video_hint=HINT)


def _split_question(text: str) -> tuple[str, list[str]]:
    """"What ...?\\n(A) x\\n(B) y\\n" -> ("What ...?", ["x", "y"]): the question without its option lines."""
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = _OPTION_LINE.match(line.strip())
        if match and match.group(1) == "A":
            options = [m.group(2).strip() for m in map(_OPTION_LINE.match, (x.strip() for x in lines[start:])) if m]
            return "\n".join(lines[:start]).strip(), options
    return text.strip(), []


def _answer(rec: dict, options: list[str], where: str) -> str | None:
    """The gold letter: MLVU_dev gives a letter, the official files a candidate's text; none in a test file."""
    if rec.get("answer") is None:
        return None
    return answer_letter(str(rec["answer"]), options, where)

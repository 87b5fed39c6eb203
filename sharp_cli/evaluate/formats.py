"""Multiple-choice video QA items from our own format and four released benchmarks, as their users
download them (official releases, Hugging Face parquet/JSON, lmms-eval's caches).

Every reader returns Items: an id unique in the set, the video's absolute path, the question, the
option texts (without "A." prefixes), the answer letter (None when the split withholds it), a
category for per-category accuracy and the benchmark's own task (group) for its headline number.
docs/eval.md shows each layout and the command that evaluates it.

    sharp           JSON list or JSONL of {video, question, options?, answer?, category?, id?, needle_boxes?};
                    video paths relative to the data file (or to --video-dir)
    videomme        readers/videomme.py: videomme/test-*.parquet or the same records as JSON; data/<videoID>.mp4
    mvbench         readers/mvbench.py: json/<task>.json; video/<folder>/... or revision `video`'s <folder>/...
    mlvu            readers/mlvu.py: MLVU/json/<n>_<task>.json, or lmms-eval's mlvu/test-*.parquet
    longvideobench  readers/longvideobench.py: lvb_val.json, lvb_test_wo_gt.json, validation/test-*.parquet

readers/lmms_cache.py joins lmms-eval's two halves (hub snapshot: questions; cache folder: videos).
"""

from __future__ import annotations

import os
from pathlib import Path

from sharp_cli.errors import SharpError, UsageError
from sharp_cli.evaluate import needles
from sharp_cli.evaluate.items import Dataset, answer_letter, columns, field_of, make_item, read_records
from sharp_cli.evaluate.items import Item as Item  # re-exported: callers build items as formats.Item
from sharp_cli.evaluate.readers import lmms_cache, longvideobench, mlvu, mvbench, videomme
from sharp_cli.letters import strip_letter_prefixes

FORMATS = ("auto", "sharp", "videomme", "mvbench", "mlvu", "longvideobench")
# Folder layouts, most specific first: MVBench's json/ names its tasks, MLVU's numbers them.
_FOLDER_READERS = (("mvbench", mvbench), ("mlvu", mlvu), ("longvideobench", longvideobench),
                   ("videomme", videomme))
MVBENCH_TASKS = mvbench.TASKS


def load(data: str | os.PathLike, fmt: str = "auto", video_dir: str | None = None,
         category_field: str | None = None) -> Dataset:
    path = Path(data).expanduser().absolute()
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not path.exists():
        raise UsageError(f"data not found: {path}")
    if video_dir is not None and not Path(video_dir).expanduser().is_dir():
        raise UsageError(f"--video-dir is not a folder: {video_dir}")
    vdir = Path(video_dir).expanduser().absolute() if video_dir else None
    path, vdir = lmms_cache.resolve(path, vdir)  # lmms-eval keeps questions and videos apart
    path = _single_annotation_file(path) or path
    fmt = detect(path) if fmt == "auto" else fmt
    reader = {"sharp": _read_sharp, "videomme": videomme.read, "mvbench": mvbench.read, "mlvu": mlvu.read,
              "longvideobench": longvideobench.read}[fmt]
    dataset = reader(path, vdir, category_field)
    if not dataset.items:
        why = f": {'; '.join(dataset.notes)}" if dataset.notes else ""
        raise SharpError(f"no questions found in {path} (format {fmt}){why}")
    seen = set()
    for item in dataset.items:
        if item.id in seen:
            raise SharpError(f"{path}: item id '{item.id}' appears twice; ids must be unique")
        seen.add(item.id)
    return dataset


def detect(path: Path) -> str:
    """The format from the folder layout, or from an annotation file's fields (a parquet file's columns)."""
    if path.is_dir():
        for name, reader in _FOLDER_READERS:
            if reader.is_root(path):
                return name
        if _items_file(path, missing_ok=True):
            return "sharp"
        raise UsageError(f"cannot tell the format of folder {path}; pass --format")
    return detect_fields(columns(path), path)


def _single_annotation_file(folder: Path) -> Path | None:
    """A folder no layout claims, holding one annotation file (e.g. videomme/test.json beside data/): that file."""
    if not folder.is_dir() or any(reader.is_root(folder) for _, reader in _FOLDER_READERS):
        return None
    if _items_file(folder, missing_ok=True):
        return None
    files = [f for pattern in ("*.parquet", "*.json", "*.jsonl") for f in sorted(folder.glob(pattern)) if f.is_file()]
    return files[0] if len(files) == 1 else None


def detect_fields(keys: set[str], path: Path) -> str:
    if "videoID" in keys:
        return "videomme"
    if "correct_choice" in keys or "option0" in keys or {"video_path", "candidates"} <= keys:
        return "longvideobench"
    if "video_name" in keys and ("task_type" in keys or "candidates" in keys):
        return "mlvu"
    if "candidates" in keys:
        return "mlvu" if "question_type" in keys or path.stem.split("_")[0].isdigit() else "mvbench"
    if "options" in keys or {"video", "question"} <= keys:
        return "sharp"
    raise UsageError(f"cannot tell the format of {path}; pass --format")


# -- our own format -----------------------------------------------------------------------------
def _read_sharp(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    file = _items_file(path) if path.is_dir() else path
    base = video_dir or file.parent
    items = []
    for i, rec in enumerate(read_records(file)):
        where = f"{file.name} item {i}"
        # Options and answer are optional: without them a question counts for agreement only.
        options = strip_letter_prefixes(field_of(rec, "options", where, list)) if rec.get("options") else []
        answer = None
        if options and rec.get("answer") is not None:
            answer = answer_letter(field_of(rec, "answer", where, (str, int)), options, where)
        elif rec.get("answer") is not None:
            raise SharpError(f"{where}: an answer needs options to be one of")
        items.append(make_item(
            rec.get("id", i), base / str(field_of(rec, "video", where)), field_of(rec, "question", where), options,
            answer, rec.get(category_field or "category"), where,
            needles.check_boxes(rec.get("needle_boxes"), where)))
    return Dataset(items, "sharp", file.stem if file.stem not in ("items", "data") else file.parent.name)


def _items_file(folder: Path, missing_ok: bool = False) -> Path | None:
    for name in ("items.jsonl", "items.json"):
        if (folder / name).is_file():
            return folder / name
    if missing_ok:
        return None
    raise UsageError(f"no items.jsonl or items.json in {folder}")


def drop_missing(dataset: Dataset, skip: bool) -> Dataset:
    """Fail on missing videos (one line, with the first path and where to point), or drop them with a note."""
    missing = [item for item in dataset.items if not os.path.isfile(item.video)]
    if not missing:
        return dataset
    if not skip:
        raise SharpError(f"{len(missing)} of {len(dataset.items)} videos not found (first: {missing[0].video}); "
                         f"{dataset.video_hint}, or --skip-missing to evaluate the rest")
    kept = [item for item in dataset.items if os.path.isfile(item.video)]
    if not kept:
        raise SharpError(f"none of the {len(dataset.items)} videos was found (first: {missing[0].video}); "
                         f"{dataset.video_hint}")
    note = f"skipped {len(missing)} questions whose video is missing (first: {missing[0].video})"
    return Dataset(kept, dataset.format, dataset.name, dataset.notes + [note], dataset.video_hint)

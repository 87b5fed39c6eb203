"""LongVideoBench (`longvideobench/LongVideoBench` on Hugging Face) as its users have it.

The download: `lvb_val.json`, `lvb_test_wo_gt.json` (the test questions, no `correct_choice`),
`validation-00000-of-00001.parquet` and `test-00000-of-00001.parquet` (the same questions with the
options in columns `option0`..`option4`, unused ones "N/A": what lmms-eval's longvideobench tasks
read), `videos/` (from `videos.tar.part.*`) and `subtitles/`. JSON records: {video_id, question,
candidates, correct_choice (0-based), id, video_path, subtitle_path, duration_group,
question_category, topic_category, duration, ...}.

Test questions have no gold answer: they are read all the same, answered, and count for agreement
with the unpruned model, not for accuracy. `duration_group` holds a group's upper bound in seconds;
the category shows the group's range instead.
"""

from __future__ import annotations

from pathlib import Path

from sharp_cli.errors import UsageError
from sharp_cli.evaluate.items import Dataset, answer_letter, field_of, find_video, make_item, read_records

# duration_group (upper bound, s) -> the group's range: the paper's four duration groups.
DURATION_GROUPS = {15: "8s-15s", 60: "15s-60s", 600: "180s-600s", 3600: "900s-3600s"}
# A folder: the validation questions first (they have answers), else the test questions.
FILES = ("lvb_val.json", "validation-*.parquet", "lvb_test_wo_gt.json", "test-*.parquet")
OPTION_COLUMNS = tuple(f"option{i}" for i in range(5))


def is_root(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in ("lvb_val.json", "lvb_test_wo_gt.json", "validation-*.parquet"))


def read(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    file = path if path.is_file() else next((f for p in FILES for f in sorted(path.glob(p))), None)
    if file is None:
        raise UsageError(f"no lvb_val.json, lvb_test_wo_gt.json or validation-*.parquet in {path}")
    folders = [video_dir] if video_dir else [file.parent / "videos", file.parent]
    field = category_field or "duration_group"
    records = read_records(file)
    items, unanswered = [], 0
    for i, rec in enumerate(records):
        where = f"{file.name} item {i}"
        options = _options(rec, where)
        answer = _answer(rec, options, where)
        unanswered += answer is None
        category = rec.get(field) if isinstance(rec, dict) else None
        if field == "duration_group" and category is not None:
            category = DURATION_GROUPS.get(_int(category), category)
        items.append(make_item(rec.get("id", i), find_video(folders, str(field_of(rec, "video_path", where))),
                               field_of(rec, "question", where), options, answer, category, where))
    notes = []
    if unanswered:
        notes.append(f"{unanswered} of {len(records)} questions have no correct_choice (the test split): they are "
                     "answered and count for agreement with the unpruned model, not for accuracy")
    name = file.stem if file.suffix == ".json" else f"longvideobench-{file.stem.split('-')[0]}"
    return Dataset(items, "longvideobench", name, notes, video_hint="pass --video-dir (the folder of the videos)")


def _options(rec, where: str) -> list[str]:
    """`candidates`, or option0..option4 up to the first "N/A" (the parquet files pad to five)."""
    if isinstance(rec, dict) and rec.get("candidates") is not None:
        return [str(c) for c in field_of(rec, "candidates", where, (list, tuple))]
    options = []
    for column in OPTION_COLUMNS:
        value = rec.get(column) if isinstance(rec, dict) else None
        if value is None or str(value) == "N/A":
            break
        options.append(str(value))
    if not options:
        field_of(rec, "candidates", where)  # says which field is missing
    return options


def _answer(rec: dict, options: list[str], where: str) -> str | None:
    """The gold letter from the 0-based `correct_choice`; None when the test split withholds it
    (missing, null, or negative: the official loader maps a missing one to -1)."""
    choice = rec.get("correct_choice")
    if choice is None or (isinstance(choice, int) and choice < 0):
        return None
    return answer_letter(field_of(rec, "correct_choice", where, int), options, where)


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value

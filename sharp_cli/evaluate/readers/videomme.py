"""Video-MME as lmms-eval and its users download it.

Hugging Face `lmms-eval/Video-MME` (what lmms-eval's `videomme` task reads, into its cache folder
`videomme`): `videomme/test-00000-of-00001.parquet`, and video zips that unzip into `data/`
(`<videoID>.mp4`; lmms-eval also accepts `.MP4` and `.mkv`). Records: {video_id, duration, domain,
sub_category, url, videoID, question_id, task_type, question, options ["A. ...", ...], answer "C"}.
The same records are also passed around as JSON or JSON lines, often in the dataset root itself
(`videomme/test.json` beside `videomme/data/`): the videos are looked for next to the annotation
file first, then one folder up, where the parquet layout keeps them.
"""

from __future__ import annotations

from pathlib import Path

from sharp_cli.errors import UsageError
from sharp_cli.evaluate.items import Dataset, answer_letter, field_of, find_video, make_item, read_records
from sharp_cli.letters import strip_letter_prefixes

VIDEO_FOLDERS = ("data", "video", "videos")


def is_root(folder: Path) -> bool:
    return any((folder / "videomme").glob("*.parquet"))


def read(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    if path.is_dir():
        files = sorted((path / "videomme").glob("*.parquet")) or sorted(path.glob("*.parquet"))
        if not files:
            raise UsageError(f"no videomme/*.parquet in {path}")
        base = path
    else:
        files, base = [path], path.parent
    folders = [video_dir] if video_dir else [root / name for root in (base, base.parent) for name in VIDEO_FOLDERS]
    items = []
    for file in files:
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            options = strip_letter_prefixes(field_of(rec, "options", where, (list, tuple)))
            items.append(make_item(
                rec.get("question_id", f"{file.stem}-{i}"),
                find_video(folders, str(field_of(rec, "videoID", where))),
                field_of(rec, "question", where), options,
                answer_letter(field_of(rec, "answer", where), options, where),
                rec.get(category_field or "duration"), where))
    return Dataset(items, "videomme", "videomme", video_hint="pass --video-dir (the folder of <videoID>.mp4 files)")

"""Multiple-choice video QA items from our own format and four released benchmark layouts.

Every reader returns Items: an id unique in the set, the video's absolute path, the question,
the option texts (without "A." prefixes), the answer letter and a category for per-category
accuracy. docs/eval.md describes each layout and the assumptions made about it.

    sharp           JSON list or JSONL of {video, question, options?, answer?, category?, id?, needle_boxes?};
                    video paths relative to the data file (or to --video-dir)
    videomme        videomme/test-*.parquet (or the same records as JSON/JSONL); videos data/<videoID>.mp4
    mvbench         json/<task>.json with {video, question, candidates, answer text}; videos video/<folder>/...
    mlvu            json/<n>_<task>.json with {video, question, candidates, answer text, question_type};
                    videos video/<n>_<task>/...
    longvideobench  lvb_val.json with {id, video_path, question, candidates, correct_choice}; videos videos/...
"""

from __future__ import annotations

import os
from pathlib import Path

from sharp_cli.errors import SharpError, UsageError
from sharp_cli.evaluate import needles
from sharp_cli.evaluate.items import Dataset, Item  # noqa: F401 - readers' results; Item re-exported
from sharp_cli.evaluate.items import answer_letter, field_of, find_video, first_dir, make_item, read_records
from sharp_cli.evaluate.letters import strip_letter_prefixes

FORMATS = ("auto", "sharp", "videomme", "mvbench", "mlvu", "longvideobench")

# MVBench json stem -> (category, folder under video/, how clips are stored). "bound": the
# question is about a start..end window of the video; "frames": a folder of frames, not a video.
MVBENCH_TASKS = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480", "bound"),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480", "bound"),
    "action_antonym": ("Action Antonym", "ssv2_video", "video"),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "video"),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "video"),
    "object_existence": ("Object Existence", "clevrer/video_validation", "video"),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480", "bound"),
    "object_shuffle": ("Object Shuffle", "perception/videos", "video"),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "video"),
    "action_localization": ("Action Localization", "sta/sta_video", "bound"),
    "scene_transition": ("Scene Transition", "scene_qa/video", "video"),
    "action_count": ("Action Count", "perception/videos", "video"),
    "moving_count": ("Moving Count", "clevrer/video_validation", "video"),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "video"),
    "state_change": ("State Change", "perception/videos", "video"),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd", "video"),
    "character_order": ("Character Order", "perception/videos", "video"),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "video"),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "frames"),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation", "video"),
}


def load(data: str | os.PathLike, fmt: str = "auto", video_dir: str | None = None,
         category_field: str | None = None) -> Dataset:
    path = Path(data).expanduser().absolute()
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not path.exists():
        raise UsageError(f"data not found: {path}")
    if video_dir is not None and not Path(video_dir).expanduser().is_dir():
        raise UsageError(f"--video-dir is not a folder: {video_dir}")
    fmt = detect(path) if fmt == "auto" else fmt
    vdir = Path(video_dir).expanduser().absolute() if video_dir else None
    reader = {"sharp": _read_sharp, "videomme": _read_videomme, "mvbench": _read_mvbench, "mlvu": _read_mlvu,
              "longvideobench": _read_longvideobench}[fmt]
    dataset = reader(path, vdir, category_field)
    if not dataset.items:
        raise SharpError(f"no questions found in {path} (format {fmt})")
    seen = set()
    for item in dataset.items:
        if item.id in seen:
            raise SharpError(f"{path}: item id '{item.id}' appears twice; ids must be unique")
        seen.add(item.id)
    return dataset


def detect(path: Path) -> str:
    """The format from the folder layout or the first record's fields."""
    if path.is_dir():
        stems = {p.stem for p in (path / "json" if (path / "json").is_dir() else path).glob("*.json")}
        if stems & set(MVBENCH_TASKS):
            return "mvbench"
        if any(s.split("_")[0].isdigit() for s in stems):
            return "mlvu"
        if (path / "lvb_val.json").exists():
            return "longvideobench"
        if list((path / "videomme").glob("*.parquet")):
            return "videomme"
        if _items_file(path, missing_ok=True):
            return "sharp"
        raise UsageError(f"cannot tell the format of folder {path}; pass --format")
    if path.suffix == ".parquet":
        return "videomme"
    records = read_records(path)
    first = records[0] if records and isinstance(records[0], dict) else {}
    if "videoID" in first:
        return "videomme"
    if "correct_choice" in first:
        return "longvideobench"
    if "candidates" in first:
        return "mlvu" if "question_type" in first or path.stem.split("_")[0].isdigit() else "mvbench"
    if "options" in first or {"video", "question"} <= set(first):
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


# -- Video-MME -------------------------------------------------------------------------------------
def _read_videomme(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    if path.is_dir():
        files = sorted((path / "videomme").glob("*.parquet")) or sorted(path.glob("*.parquet"))
        if not files:
            raise UsageError(f"no videomme/*.parquet in {path}")
        root = path
    else:
        files = [path]
        root = path.parent.parent if path.parent.name == "videomme" else path.parent
    vdir = video_dir or first_dir(root, ("data", "video", "videos"))
    items = []
    for file in files:
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            options = strip_letter_prefixes(field_of(rec, "options", where, (list, tuple)))
            items.append(make_item(
                rec.get("question_id", f"{file.stem}-{i}"), find_video(vdir, str(field_of(rec, "videoID", where))),
                field_of(rec, "question", where), options, answer_letter(field_of(rec, "answer", where), options, where),
                rec.get(category_field or "duration"), where))
    return Dataset(items, "videomme", "videomme")


# -- MVBench ---------------------------------------------------------------------------------------
def _read_mvbench(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    files, root = _task_files(path)
    vroot = video_dir or root / "video"
    items, notes, bound_tasks = [], [], []
    for file in files:
        category, folder, kind = MVBENCH_TASKS.get(file.stem, (file.stem, "", "video"))
        if kind == "frames":
            notes.append(f"skipped MVBench task '{category}': its clips are frame folders, not videos")
            continue
        if kind == "bound":
            bound_tasks.append(category)
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            options = [str(c) for c in field_of(rec, "candidates", where, list)]
            name = str(field_of(rec, "video", where))
            video = vroot / folder / name
            if not video.exists() and (vroot / "data0613" / folder / name).exists():
                video = vroot / "data0613" / folder / name
            items.append(make_item(f"{file.stem}-{i}", video, field_of(rec, "question", where), options,
                               answer_letter(str(field_of(rec, "answer", where)), options, where),
                               rec.get(category_field) if category_field else category, where))
    if bound_tasks:
        notes.append(f"MVBench start/end windows are not applied (whole videos are sampled): {', '.join(bound_tasks)}")
    return Dataset(items, "mvbench", "mvbench", notes)


# -- MLVU (dev) ------------------------------------------------------------------------------------
def _read_mlvu(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    files, root = _task_files(path)
    vroot = video_dir or root / "video"
    items, skipped = [], 0
    for file in files:
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            if "candidates" not in rec:  # generation tasks (sub-scene captioning, summaries)
                skipped += 1
                continue
            options = [str(c) for c in field_of(rec, "candidates", where, list)]
            items.append(make_item(
                rec.get("question_id", f"{file.stem}-{i}"), vroot / file.stem / str(field_of(rec, "video", where)),
                field_of(rec, "question", where), options,
                answer_letter(str(field_of(rec, "answer", where)), options, where),
                rec.get(category_field or "question_type", file.stem), where))
    notes = [f"skipped {skipped} MLVU questions without candidates (open-ended tasks)"] if skipped else []
    return Dataset(items, "mlvu", "mlvu", notes)


def _task_files(path: Path) -> tuple[list[Path], Path]:
    """(task json files, benchmark root) from the root, its json/ folder or one task file."""
    if path.is_file():
        return [path], path.parent.parent if path.parent.name == "json" else path.parent
    json_dir = path / "json" if (path / "json").is_dir() else path
    files = sorted(json_dir.glob("*.json"))
    if not files:
        raise UsageError(f"no task .json files in {json_dir}")
    return files, json_dir.parent if json_dir.name == "json" else json_dir


# -- LongVideoBench --------------------------------------------------------------------------------
def _read_longvideobench(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    file = path / "lvb_val.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"no lvb_val.json in {path}")
    vroot = video_dir or file.parent / "videos"
    items, unanswered = [], 0
    for i, rec in enumerate(read_records(file)):
        where = f"{file.name} item {i}"
        if rec.get("correct_choice") is None:
            unanswered += 1
            continue
        options = [str(c) for c in field_of(rec, "candidates", where, list)]
        items.append(make_item(
            rec.get("id", i), vroot / str(field_of(rec, "video_path", where)), field_of(rec, "question", where),
            options, answer_letter(field_of(rec, "correct_choice", where, int), options, where),
            rec.get(category_field or "duration_group"), where))
    notes = [f"skipped {unanswered} questions without correct_choice (test split?)"] if unanswered else []
    return Dataset(items, "longvideobench", file.stem, notes)


def drop_missing(dataset: Dataset, skip: bool) -> Dataset:
    """Fail on missing videos (one line, with the first path), or drop them with a note."""
    missing = [item for item in dataset.items if not os.path.isfile(item.video)]
    if not missing:
        return dataset
    if not skip:
        raise SharpError(f"{len(missing)} of {len(dataset.items)} videos not found (first: {missing[0].video}); "
                         "pass --video-dir, or --skip-missing to evaluate the rest")
    kept = [item for item in dataset.items if os.path.isfile(item.video)]
    if not kept:
        raise SharpError(f"none of the {len(dataset.items)} videos was found (first: {missing[0].video})")
    note = f"skipped {len(missing)} questions whose video is missing (first: {missing[0].video})"
    return Dataset(kept, dataset.format, dataset.name, dataset.notes + [note])

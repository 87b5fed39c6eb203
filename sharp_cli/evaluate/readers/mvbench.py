"""MVBench (`OpenGVLab/MVBench` on Hugging Face) in both of its released layouts.

main revision: `json/<task>.json` and `video/*.zip`, unzipped into `video/<folder>/` (the folders of
the official evaluation notebook: `video/star/Charades_v1_480/`, `video/ssv2_video/`, ...; clips
re-released later sit under `video/data0613/<folder>/`).
revision `video` (what lmms-eval's mvbench tasks download, into their cache folder `mvbench_video`):
the task folders at the root, five of them under other names (`ssv2_video_mp4`, `star/Charades_segment`,
`sta/sta_video_segment`, `nturgbd_convert`, `tvqa/video_fps3_hq_segment`), the clips of the tasks
that ask about a start..end window already cut to it, Episodic Reasoning as videos rather than
frame folders, and Action Antonym as .mp4 rather than .webm.

Records: {video, question, candidates, answer (a candidate's text)} (+ start, end for windowed tasks).
Every layout is tried for every question (and every video suffix), so either json/ works with either
video tree; --video-dir names the folder that holds the task folders.
"""

from __future__ import annotations

from pathlib import Path

from sharp_cli.evaluate.items import VIDEO_SUFFIXES, Dataset, answer_letter, field_of, make_item, read_records
from sharp_cli.evaluate.readers.tasks import task_files

# json stem -> (task name, folder in the main revision, folder in revision `video`).
TASKS = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480", "star/Charades_segment"),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480", "star/Charades_segment"),
    "action_antonym": ("Action Antonym", "ssv2_video", "ssv2_video_mp4"),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "Moments_in_Time_Raw/videos"),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "FunQA_test/test"),
    "object_existence": ("Object Existence", "clevrer/video_validation", "clevrer/video_validation"),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480", "star/Charades_segment"),
    "object_shuffle": ("Object Shuffle", "perception/videos", "perception/videos"),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "clevrer/video_validation"),
    "action_localization": ("Action Localization", "sta/sta_video", "sta/sta_video_segment"),
    "scene_transition": ("Scene Transition", "scene_qa/video", "scene_qa/video"),
    "action_count": ("Action Count", "perception/videos", "perception/videos"),
    "moving_count": ("Moving Count", "clevrer/video_validation", "clevrer/video_validation"),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "clevrer/video_validation"),
    "state_change": ("State Change", "perception/videos", "perception/videos"),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd", "nturgbd_convert"),
    "character_order": ("Character Order", "perception/videos", "perception/videos"),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "vlnqa"),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "tvqa/video_fps3_hq_segment"),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation", "clevrer/video_validation"),
}
HINT = ("pass --video-dir (the folder that holds MVBench's task folders: star/, clevrer/, perception/, "
        "ssv2_video/ or ssv2_video_mp4/, ...)")


def is_root(folder: Path) -> bool:
    json_dir = folder / "json" if (folder / "json").is_dir() else folder
    return any(p.stem in TASKS for p in json_dir.glob("*.json"))


def read(path: Path, video_dir: Path | None, category_field: str | None) -> Dataset:
    files, root = task_files(path)
    bases = [video_dir] if video_dir else [root / "video", root]
    items, windows_kept, frame_folders = [], {}, {}
    for file in files:
        task, main, cut = TASKS.get(file.stem, (file.stem, "", ""))
        for i, rec in enumerate(read_records(file)):
            where = f"{file.name} item {i}"
            options = [str(c) for c in field_of(rec, "candidates", where, list)]
            video, kind = _locate(bases, main, cut, str(field_of(rec, "video", where)), rec)
            if kind == "frames":
                frame_folders[task] = frame_folders.get(task, 0) + 1
                continue
            if kind == "whole" and rec.get("start") is not None and main != cut:
                windows_kept[task] = windows_kept.get(task, 0) + 1
            items.append(make_item(f"{file.stem}-{i}", video, field_of(rec, "question", where), options,
                                   answer_letter(str(field_of(rec, "answer", where)), options, where),
                                   rec.get(category_field) if category_field else task, where, group=task))
    notes = [f"skipped {n} {task} questions: their clips are frame folders, not videos (revision 'video' of "
             "OpenGVLab/MVBench has them as videos)" for task, n in frame_folders.items()]
    if windows_kept:
        notes.append(f"{sum(windows_kept.values())} questions ask about a start..end window of a whole video; sharp "
                     f"samples the whole video ({', '.join(windows_kept)}); revision 'video' has the windows cut")
    return Dataset(items, "mvbench", "mvbench", notes, video_hint=HINT)


def _locate(bases: list[Path], main: str, cut: str, name: str, rec: dict) -> tuple[Path, str]:
    """(path, "cut" | "whole" | "frames" | "missing") of a question's clip, over both layouts.

    Candidate names: the record's, the same stem with another video suffix, and for windowed
    questions the cut clip's name `<stem>_<start>_<end>.mp4` (how revision `video` names them)."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in {s.lower() for s in VIDEO_SUFFIXES} else name
    names = [name, *(stem + s for s in VIDEO_SUFFIXES)]
    if rec.get("start") is not None and rec.get("end") is not None:
        names.append(f"{stem}_{rec['start']}_{rec['end']}.mp4")
    names = list(dict.fromkeys(names))
    folders = [(base / prefix / folder, "cut" if folder == cut and cut != main else "whole")
               for base in bases for prefix in ("", "data0613") for folder in dict.fromkeys((main, cut)) if folder]
    folders += [(base, "whole") for base in bases]  # a flat --video-dir
    for folder, kind in folders:
        for candidate in names:
            if (folder / candidate).is_file():
                return folder / candidate, kind
    for folder, _ in folders:
        if (folder / name).is_dir():
            return folder / name, "frames"
    # Missing: show it where the layout that is there expects it: a task folder that exists, else
    # video/<folder> of the main revision when there is a video/, else revision `video`'s folder.
    existing = [f for f, _ in folders[: -len(bases)] if f.is_dir()]
    if existing:
        return existing[0] / name, "missing"
    return (bases[0] / main if bases[0].is_dir() else bases[-1] / (cut or main)) / name, "missing"

"""lmms-eval's caches: where its video tasks keep a benchmark, so `sharp eval` can read it from there.

lmms-eval downloads a video task's Hugging Face dataset with snapshot_download (annotations and
archives land in the hub cache, `$HF_HOME/hub/datasets--<owner>--<name>/snapshots/<sha>/`) and
unpacks the archives into the task's `cache_dir` under `$HF_HOME` (lmms_eval/api/task.py). So the
questions and the videos are in two places. Either may be given as DATA: the cache folder (its
snapshot's annotation file is found), or the snapshot or a file in it (the cache folder's videos
are used unless --video-dir says otherwise). MVBench's cache folder is a link to its snapshot
(`create_link`) and needs nothing of this.
"""

from __future__ import annotations

from pathlib import Path

# cache_dir (under $HF_HOME) -> (hub repos, annotation files in the snapshot, video folder in the cache)
# from the task yamls: videomme.yaml, mlvu_dev.yaml, mlvu_test.yaml, longvideobench_val_v.yaml.
CACHES = {
    "videomme": (("lmms-eval/Video-MME", "lmms-lab/Video-MME"), "videomme/*.parquet", "data"),
    "mlvu": (("sy1998/MLVU_dev",), "mlvu/*.parquet", ""),
    "mlvu_test": (("sy1998/MLVU_Test",), "mlvu_test/*.parquet", ""),
    "datasets/longvideobench": (("longvideobench/LongVideoBench",), "validation-*.parquet", "videos"),
}


def resolve(path: Path, video_dir: Path | None) -> tuple[Path, Path | None]:
    """(annotations to read, video folder) for a path in an lmms-eval cache; (path, video_dir) otherwise."""
    if path.is_dir() and not _has_annotations(path):
        for cache, (repos, pattern, videos) in CACHES.items():
            depth = cache.count("/") + 1
            if len(path.parts) > depth and "/".join(path.parts[-depth:]) == cache:
                found = _snapshot_file(path.parents[depth - 1], repos, pattern)
                if found is not None:
                    return found, video_dir or path / videos
    hub = _hub_repo(path)
    if hub is not None and video_dir is None:
        hf_home, repo = hub
        for cache, (repos, _, videos) in CACHES.items():
            if repo in repos and (hf_home / cache).is_dir():
                return path, hf_home / cache / videos
    return path, video_dir


def _snapshot_file(hf_home: Path, repos, pattern: str) -> Path | None:
    """The newest snapshot's annotation file of the first repo that has one."""
    for repo in repos:
        snapshots = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots"
        files = sorted(snapshots.glob(f"*/{pattern}"), key=lambda p: p.stat().st_mtime)
        if files:
            return files[-1]
    return None


def _hub_repo(path: Path) -> tuple[Path, str] | None:
    """($HF_HOME, "owner/name") when path is in a hub snapshot of a dataset."""
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i] == "hub" and parts[i + 1].startswith("datasets--") and parts[i + 2] == "snapshots":
            owner, _, name = parts[i + 1][len("datasets--"):].partition("--")
            return Path(*parts[:i]), f"{owner}/{name}"
    return None


def _has_annotations(folder: Path) -> bool:
    return (folder / "json").is_dir() or any(any(folder.glob(p)) for p in ("*.parquet", "*.json", "*.jsonl"))

"""The positional prior: layer-K scores of a black video with the same layout.

It depends on the layout (frames, token grid, prompt shape), the model and the pruning layer, not
on the content, so it is computed once and cached: in memory for the process, and on disk under
the user cache dir (safetensors, written atomically) for later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PRIOR_VERSION = 1


def cache_dir() -> Path:
    if os.environ.get("SHARP_CACHE_DIR"):
        return Path(os.environ["SHARP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sharp"


class PriorStore:
    def __init__(self, directory: Path | None = None, use_disk: bool = True):
        self.directory = (directory or cache_dir()) / "priors"
        self.use_disk = use_disk
        self._memory: dict[str, object] = {}
        self.last_error: str | None = None

    @staticmethod
    def key(parts: dict) -> str:
        blob = json.dumps(dict(parts, version=PRIOR_VERSION), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str):
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.safetensors"
        if self.use_disk and path.exists():
            from safetensors.torch import load_file

            try:
                prior = load_file(str(path))["prior"]
            except Exception:  # a damaged file is recomputed, never trusted
                return None
            self._memory[key] = prior
            return prior
        return None

    def put(self, key: str, prior, meta: dict) -> None:
        self._memory[key] = prior
        if not self.use_disk:
            return
        from safetensors.torch import save_file

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            save_file({"prior": prior.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={k: str(v) for k, v in meta.items()})
            os.replace(tmp, self.directory / f"{key}.safetensors")
        except OSError as exc:  # read-only home, full disk: keep the in-memory copy
            self.last_error = str(exc)

"""The positional prior: layer-K attention of a black video with the same layout, per head (H, N).

It depends on the layout (frames, token grid, prompt shape), the model and the pruning layer, not
on the content, so it is computed once and cached: in memory for the process, and on disk under
the user cache dir (safetensors, written atomically) for later runs. The key (prior_pass.py) names
the model by what it is, not by what was typed: its files (config, weights index, safetensors
headers and blob names) and a sample of its loaded weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

PRIOR_VERSION = 3  # 2: keys name the model's files and weights, the prompt's tokens and positions; 3: per head (H, N)


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

        tmp = self.directory / f".{key}.{os.getpid()}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file({"prior": prior.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={k: str(v) for k, v in meta.items()})
            os.replace(tmp, self.directory / f"{key}.safetensors")
        except Exception as exc:  # noqa: BLE001 - read-only folder, full disk (safetensors raises its own
            self._not_written(tmp, exc)  # error, not OSError): the in-memory copy serves this process

    def _not_written(self, tmp: Path, exc: Exception) -> None:
        """Say once, in one line, that the cache is not being written; leave no partial file."""
        import sys

        from sharp_cli.errors import one_line

        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        first, self.last_error = self.last_error is None, one_line(getattr(exc, "strerror", None) or str(exc), 200)
        if first:
            sys.stderr.write(f"sharp: warning: cannot write the positional-prior cache in {self.directory} "
                             f"({self.last_error}); priors are kept in memory for this run only\n")
            sys.stderr.flush()


def digest(data) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else str(data).encode()).hexdigest()[:16]


def files_fingerprint(folder: str | None) -> str | None:
    """The model's files, cheaply: config.json and the weights index byte for byte, and of each
    safetensors file its size, its header (tensor names, dtypes, shapes, offsets) and the name of
    the file it links to (the hub cache names blobs by their content's hash)."""
    if not folder or not os.path.isdir(folder):
        return None
    parts = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == "config.json" or name.endswith(".safetensors.index.json"):
            parts.append((name, digest(Path(path).read_bytes())))
        elif name.endswith(".safetensors"):
            parts.append((name, os.path.getsize(path), os.path.basename(os.path.realpath(path)),
                          digest(_safetensors_header(path))))
    return digest(json.dumps(parts))


def _safetensors_header(path: str) -> bytes:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return fh.read(min(length, 100_000_000))


def weights_fingerprint(model, per_tensor: int = 8) -> str:
    """The first few values of every parameter and buffer, as loaded: two checkpoints of one
    architecture (a fine-tune, another seed) differ here even when their files look alike."""
    import torch

    tensors = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.numel()]
    with torch.no_grad():  # one copy to the host for all of them
        device = tensors[0][1].device if tensors else "cpu"
        sample = torch.cat([t.detach().reshape(-1)[:per_tensor].float().to(device) for _, t in tensors]).cpu() \
            if tensors else torch.zeros(0)
    names = [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors]
    return digest(sample.numpy().tobytes() + json.dumps(names).encode())

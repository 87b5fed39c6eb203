"""What one loaded model can keep between questions about the same video (serve, batch, eval).

Three things, each costing a full recompute on a miss, none depending on the question:
- the sampled frames, keyed by the file's identity (real path, inode, size, mtime) and every sampling
  setting;
- the vision encoder's output for those frames (the processor's pixel budget included);
- the prompt's start up to the video's last token after layers 0..K-1 (engine.Prefix): with the
  video before the question, those rows see nothing of the question, so a second question runs
  layers 0..K-1 on its own rows only. It is keyed by what shapes those rows (K, the segment mask,
  or unpruned) and reused only when the new prompt begins with exactly the same token ids.

Entries are dropped least recently used first once they hold more than `max_bytes` together
(frames in host memory, the rest on the model's device). A modified file gets a new key, so a
stale entry is never served; it just ages out.
"""

from __future__ import annotations

import os
import threading

from sharp_cli import video as video_mod


class VideoCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: dict = {}  # key -> (value, bytes); insertion order = least recently used first
        self.bytes = 0
        self.hits = {"frames": 0, "vision": 0, "prefix": 0}
        self.misses = {"frames": 0, "vision": 0, "prefix": 0}
        self._lock = threading.Lock()  # serve decodes the next videos in other threads than the model's

    # -- the store ------------------------------------------------------------------------------
    def _get(self, key, kind: str):
        with self._lock:
            return self._get_locked(key, kind)

    def _get_locked(self, key, kind: str):
        entry = self._entries.pop(key, None)
        if entry is None:
            self.misses[kind] += 1
            return None
        self._entries[key] = entry
        self.hits[kind] += 1
        return entry[0]

    def _put(self, key, value, size: int) -> None:
        with self._lock:
            self._put_locked(key, value, size)

    def _put_locked(self, key, value, size: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            _, dropped = self._entries.pop(next(iter(self._entries)))
            self.bytes -= dropped
        self._entries[key] = (value, size)
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)

    # -- frames ---------------------------------------------------------------------------------
    def load_video(self, path, **sampling):
        """video.load_video, from the cache when this file (unchanged) was sampled the same way."""
        real = os.path.realpath(os.fspath(path))
        try:
            st = os.stat(path)  # the file `path` opens (an open file's /proc/self/fd path: that file)
        except OSError:  # missing or unreadable: load_video says so in its own words
            return video_mod.load_video(path, **sampling)
        key = ("frames", real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, tuple(sorted(sampling.items())))
        clip = self._get(key, "frames")
        if clip is None:
            clip = video_mod.load_video(path, **sampling)
            clip.key = key
            self._put(key, clip, clip.frames.nbytes)
        return clip

    # -- vision output --------------------------------------------------------------------------
    @staticmethod
    def _vision_key(loaded, clip, max_pixels):
        return ("vision", clip.key, id(loaded.model), max_pixels)

    def vision(self, loaded, clip, max_pixels):
        """(vision output, video layout or None) of this clip, or None."""
        if getattr(clip, "key", None) is None:
            return None
        return self._get(self._vision_key(loaded, clip, max_pixels), "vision")

    def knows_vision(self, loaded, clip, max_pixels) -> bool:
        """Whether vision() would find this clip now, without counting a hit or a miss or making it
        recently used (a preparing thread asks; the model's thread then gets it, or not, itself)."""
        if getattr(clip, "key", None) is None:
            return False
        with self._lock:
            return self._vision_key(loaded, clip, max_pixels) in self._entries

    def put_vision(self, loaded, clip, max_pixels, features, layout=None) -> None:
        """layout: engine.video_layout of the inputs, so a later question need not process the frames."""
        if getattr(clip, "key", None) is not None:
            self._put(self._vision_key(loaded, clip, max_pixels), (features, layout), _nbytes(features))

    # -- the prompt's question-independent start ------------------------------------------------
    @staticmethod
    def _prefix_key(loaded, clip, cfg, max_pixels):
        shape = ("pruned", cfg.layer, cfg.uses_segment_mask, cfg.segment_frames, cfg.segment_attention) \
            if cfg.prunes else ("unpruned",)
        return ("prefix", clip.key, id(loaded.model), max_pixels, shape)

    def prefix(self, loaded, clip, cfg, max_pixels, ids):
        if getattr(clip, "key", None) is None:
            return None
        key = self._prefix_key(loaded, clip, cfg, max_pixels)
        found = self._get(key, "prefix")
        if found is not None and (found.ids.numel() != ids.numel() or not bool((found.ids == ids.reshape(-1)).all())):
            with self._lock:  # another system prompt or template before the video
                self.hits["prefix"] -= 1
                self.misses["prefix"] += 1
            return None
        return found

    def put_prefix(self, loaded, clip, cfg, max_pixels, prefix) -> None:
        if getattr(clip, "key", None) is not None:
            self._put(self._prefix_key(loaded, clip, cfg, max_pixels), prefix, prefix.nbytes)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": dict(self.hits), "misses": dict(self.misses)}


def _nbytes(value) -> int:
    if hasattr(value, "numel"):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0

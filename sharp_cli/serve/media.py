"""Where a request's video comes from, and what the server lets a request read.

A `video_url` is a file:// URL or a plain path (read only under --media-dir, after `..` and
symlinks are resolved, so neither can step outside it), or a data:video/...;base64, URL (an
upload, bounded by --max-upload-mb, written to a temporary file as soon as the request is checked,
and removed once its frames are decoded). The server fetches nothing from the network: http(s)
URLs are refused.

A path is checked when the request arrives (a quick 403), and checked again where it counts: the
file is opened once when its frames are decoded, the opened file's own location is checked, and
the decoders read that opened file through /proc/self/fd (`VideoSource.opened`). A file swapped
for a symlink to elsewhere in between is refused, not read.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sharp_cli.errors import VideoError
from sharp_cli.serve.schema import ApiError

MB = 1_000_000
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SUFFIX = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv", "x-msvideo": ".avi",
           "mpeg": ".mpg", "ogg": ".ogv", "3gpp": ".3gp", "x-flv": ".flv", "mp2t": ".ts"}


@dataclass(frozen=True)
class VideoSource:
    label: str  # how the answer's `sharp.video` names it
    path: str | None = None  # a local file: under the media folder, or an upload saved by save()
    payload: str | None = None  # base64 of an upload not saved yet
    suffix: str = ".mp4"
    temporary: bool = False  # path is an upload's temporary file
    root: Path | None = None  # a local file's media folder: checked again once the file is open

    @contextmanager
    def opened(self):
        """A path that names the very file the request may read: a local file is opened once, the
        opened file must be a regular file under the media folder (else VideoError or a 403), and
        the path yielded reads that open file (/proc/self/fd/N), whatever `path` names by now."""
        if self.root is None or self.path is None:
            yield self.path
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOCTTY", 0))
        except OSError as exc:  # NONBLOCK: a FIFO planted here cannot hang the decoding thread
            reason = "file not found" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
            raise VideoError(f"cannot read video '{self.label}': {reason}") from None
        try:
            opened = _opened_path(fd)
            where = opened or os.path.realpath(self.path)
            if os.path.commonpath([where, str(self.root)]) != str(self.root):
                raise ApiError(403, f"'{self.label}' is outside the folder this server reads videos from "
                               "(--media-dir)", "outside_media_dir", type="permission_error", param="video_url")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VideoError(f"cannot read video '{self.label}': not a regular file")
            if opened is None and os.stat(where).st_ino != os.fstat(fd).st_ino:  # no /proc: the best check left
                raise ApiError(403, f"'{self.label}' changed while it was being opened", "outside_media_dir",
                               type="permission_error", param="video_url")
            yield _FD_PATH.format(fd) if opened is not None else where
        finally:
            os.close(fd)

    def save(self, upload_dir: Path) -> "VideoSource":
        """An upload written to a temporary file (blocking): from here on the request holds a
        path, not the video as base64 text in memory. A local file is returned as it is."""
        if self.payload is None:
            return self
        data = _decode_base64(self.payload)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=self.suffix, dir=upload_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except BaseException:
            os.unlink(name)
            raise
        return VideoSource(label=self.label, path=name, temporary=True)

    def discard(self) -> None:
        """Remove an upload's temporary file (once its frames are decoded, or the request failed)."""
        if self.temporary and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class MediaPolicy:
    root: Path  # the media folder, resolved
    max_upload_bytes: int

    @classmethod
    def create(cls, media_dir: str | os.PathLike, max_upload_mb: float) -> "MediaPolicy":
        return cls(Path(os.path.realpath(media_dir)), int(max_upload_mb * MB))

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the biggest upload as base64, plus room for the JSON around it."""
        return -(-self.max_upload_bytes * 4 // 3) + MB

    def source(self, url: str) -> VideoSource:
        """Check a video_url without reading the video; ApiError (400, 403 or 413) when refused."""
        url = url.strip()
        if not url:
            raise ApiError(400, "the video_url is empty", "invalid_video_url", param="video_url")
        if url[:5].lower() == "data:":
            return self._upload(url)
        if _URL.match(url):
            scheme = url.split(":", 1)[0].lower()
            if scheme in ("http", "https"):
                raise ApiError(400, "sharp serve does not fetch videos from the network: send the video as a "
                               "data:video/...;base64, URL, or as a file:// URL or path under the server's "
                               "--media-dir", "unsupported_url", param="video_url")
            if scheme != "file":
                raise ApiError(400, f"unsupported URL scheme '{scheme}:'; use file://, a path or data:",
                               "unsupported_url", param="video_url")
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ApiError(400, f"file URLs need an absolute path (file:///...), got host '{parts.netloc}'",
                               "invalid_video_url", param="video_url")
            return self._local(unquote(parts.path), url)
        return self._local(url, url)

    def _local(self, path: str, given: str) -> VideoSource:
        candidate = path if os.path.isabs(path) else os.path.join(self.root, path)
        try:
            real = os.path.realpath(candidate)
        except (ValueError, OSError) as exc:  # an embedded NUL byte, a symlink loop
            raise ApiError(400, f"bad video path: {exc}", "invalid_video_url", param="video_url") from None
        if os.path.commonpath([real, str(self.root)]) != str(self.root):
            raise ApiError(403, f"'{given}' is outside the folder this server reads videos from (--media-dir)",
                           "outside_media_dir", type="permission_error", param="video_url")
        return VideoSource(label=real, path=real, root=self.root)

    def _upload(self, url: str) -> VideoSource:
        header, comma, payload = url[5:].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        mime = params[0]
        if not comma or "base64" not in params[1:] or not mime.startswith("video/"):
            raise ApiError(400, "a data: URL must look like data:video/mp4;base64,<data>", "invalid_video_url",
                           param="video_url")
        size = len(payload) * 3 // 4  # decoded size, give or take the padding
        if size > self.max_upload_bytes:
            limit = ("this server takes no uploads (--max-upload-mb 0)" if not self.max_upload_bytes else
                     f"this server takes at most {self.max_upload_bytes / MB:g} MB (--max-upload-mb)")
            raise ApiError(413, f"the uploaded video is {size / MB:.1f} MB; {limit}", "upload_too_large",
                           param="video_url")
        subtype = mime.split("/", 1)[1]
        return VideoSource(label=f"upload ({mime}, {size} bytes)", payload=payload,
                           suffix=_SUFFIX.get(subtype, ".video"))


_FD_PATH = "/proc/self/fd/{}"


def _opened_path(fd: int) -> str | None:
    """Where the open file `fd` is (the kernel's own name for it, no symlink in it); None where
    there is no /proc (then the path is checked by name and inode)."""
    try:
        return os.readlink(_FD_PATH.format(fd))
    except OSError:
        return None


def _decode_base64(payload: str) -> bytes:
    if any(c in payload for c in "\r\n "):  # some encoders wrap lines
        payload = "".join(payload.split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: URL is not valid base64", "invalid_video_url", param="video_url") from None

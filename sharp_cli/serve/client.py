"""`sharp ask --server URL`: one question to a running `sharp serve`, so a shell loop pays for the
model load and CUDA warm-up once, in the server, instead of once per question.

`run` is the command's side (what `sharp ask` prints), `ask` the request. The video goes by path
when the server runs on this machine and reads it (under its --media-dir), else uploaded as a
data: URL (within its --max-upload-mb). The answer comes back as `sharp ask --json`'s record,
streamed when a terminal watches it. Standard library only (urllib): nothing here imports torch,
so the client starts in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from sharp_cli.errors import SharpError, UsageError, VideoError, one_line

CONNECT_SECONDS = 10.0  # to reach the server at all
ANSWER_SECONDS = 24 * 3600.0  # a queued request may wait long for its turn; each read may take this long
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_VIDEO_TYPES = {".mkv": "video/x-matroska", ".webm": "video/webm", ".mov": "video/quicktime",
                ".avi": "video/x-msvideo", ".mp4": "video/mp4", ".m4v": "video/mp4", ".ts": "video/mp2t"}


# What a request to `sharp serve` can carry (overrides.OptionFields), by ask's parameter names.
_SERVER_FIELDS = {"method": "method", "ratio": "ratio", "layer": "layer", "frames": "frames", "fps": "fps",
                  "max_pixels": "max_pixels", "max_new_tokens": "max_tokens", "temperature": "temperature",
                  "top_p": "top_p", "top_k": "top_k", "seed": "seed"}


def run(ctx, server: str, video: str, question: str, json_out: bool, quiet: bool, given: dict) -> None:
    """`sharp ask --server`: the question to a running `sharp serve`, printed as a local answer is.
    ctx: the ask command's click context (which options came from the command line); given: the
    values of the options a request can carry."""
    import typer

    from sharp_cli import report
    from sharp_cli.options import stderr_console

    def from_command_line(name: str) -> bool:  # by name: Typer may vendor its own click
        return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"

    fixed = [f"--{name.replace('_', '-')}" for name in ctx.params
             if name not in (*_SERVER_FIELDS, "model", "video", "question", "json_out", "quiet", "server")
             and from_command_line(name)]
    if fixed:
        raise UsageError(f"{', '.join(fixed)}: set by the server for its model (sharp serve takes them), "
                         "not per question with --server")
    if not question.strip():
        raise UsageError("the question is empty")
    options = {field: given[name] for name, field in _SERVER_FIELDS.items() if from_command_line(name)}
    model = ctx.params["model"] if from_command_line("model") else None
    console = stderr_console(quiet)
    live = not json_out and not quiet and sys.stdout.isatty()
    with console.status("asking the server") as status:
        def show(piece: str) -> None:
            status.stop()
            sys.stdout.write(piece)
            sys.stdout.flush()

        record = ask(server, video, question, options, model=model, on_text=show if live else None,
                     api_key=os.environ.get("SHARP_API_KEY") or None)
    record.setdefault("warmup", 0)
    record.setdefault("load_seconds", None)
    if json_out:
        report.print_json(record)
    elif live:
        typer.echo("" if record["answer"] else "(empty answer)")
    else:
        typer.echo(record["answer"])
    if not quiet:
        console.print(report.ask_table(record, width=console.width))


def base_url(server: str) -> str:
    """http://host:port of a server given as host:port, http://host:port or http://host:port/v1."""
    url = server.strip().rstrip("/")
    if not url:
        raise UsageError("--server (or SHARP_SERVER) is empty")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--server must be an http(s) URL, got '{server}'")
    return url[:-3] if url.endswith("/v1") else url


def ask(server: str, video: str, question: str, options: dict, model: str | None = None, on_text=None,
        api_key: str | None = None) -> dict:
    """The answer's record (`sharp ask --json`'s keys) from the server at `server`. options: the
    request fields to send (method, ratio, max_tokens, ...; the server's defaults for the rest)."""
    base = base_url(server)
    path = _checked(video)
    started = time.perf_counter()
    health = _call(base, "/health", None, api_key, CONNECT_SECONDS)
    if health.get("status") != "ok":
        raise SharpError(f"sharp serve at {base} is {health.get('status', 'not ready')}; try again later")
    local = urlsplit(base).hostname in _LOCAL_HOSTS
    body = {"model": model, "messages": None, "stream": on_text is not None, **options}
    record = None
    if local:  # the server may read it where it is: no upload
        body["messages"] = _message("file://" + os.path.abspath(path), question)
        try:
            record = _answer(base, body, api_key, on_text)
        except _Refused as exc:
            if exc.code not in ("outside_media_dir", "invalid_video"):
                raise exc.error() from None
    if record is None:
        body["messages"] = _message(_data_url(path), question)
        try:
            record = _answer(base, body, api_key, on_text)
        except _Refused as exc:
            raise exc.error() from None
    record.update(video=video, server=base, request_seconds=time.perf_counter() - started)
    return record


def _checked(video: str) -> str:
    if not os.path.exists(video):
        raise VideoError(one_line(f"cannot read video '{video}': file not found"))
    if not os.path.isfile(video):
        raise VideoError(one_line(f"cannot read video '{video}': not a regular file"))
    return video


def _message(url: str, question: str) -> list:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def _data_url(path: str) -> str:
    kind = _VIDEO_TYPES.get(os.path.splitext(path)[1].lower()) or mimetypes.guess_type(path)[0] or "video/mp4"
    if not kind.startswith("video/"):
        kind = "video/mp4"
    with open(path, "rb") as handle:
        return f"data:{kind};base64," + base64.b64encode(handle.read()).decode("ascii")


class _Refused(Exception):
    """The server answered with an error body."""

    def __init__(self, status: int, message: str, code: str | None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def error(self) -> SharpError:
        if self.code == "invalid_video":  # as a local `sharp ask` says it (exit 1), not a bad flag (2)
            return VideoError(self.message)
        if self.status == 400:
            return UsageError(f"the server refused the question: {self.message}")
        return SharpError(f"sharp serve said: {self.message}")


def _request(base: str, route: str, body: dict | None, api_key: str | None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(base + route, data=data, headers=headers, method="POST" if data else "GET")


def _open(base: str, route: str, body: dict | None, api_key: str | None, timeout: float):
    try:
        return urllib.request.urlopen(_request(base, route, body, api_key), timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SharpError(f"cannot reach sharp serve at {base}: {getattr(reason, 'strerror', None) or reason}; "
                         "is it running? (start it with: sharp serve -m MODEL)") from None


def _refusal(exc: urllib.error.HTTPError) -> _Refused:
    try:
        error = json.loads(exc.read()).get("error") or {}
    except (ValueError, OSError, AttributeError):
        error = {}
    if exc.code == 401:
        return _Refused(401, "the API key was refused; set SHARP_API_KEY to the server's key", "invalid_api_key")
    return _Refused(exc.code, one_line(error.get("message") or f"HTTP {exc.code}"), error.get("code"))


def _call(base: str, route: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    try:
        with _open(base, route, body, api_key, timeout) as response:
            return json.loads(response.read())
    except _Refused as exc:
        raise exc.error() from None
    except ValueError:
        raise SharpError(f"{base} did not answer like sharp serve (no JSON from {route})") from None


def _answer(base: str, body: dict, api_key: str | None, on_text) -> dict:
    with _open(base, "/v1/chat/completions", body, api_key, ANSWER_SECONDS) as response:
        if not body["stream"]:
            reply = json.loads(response.read())
            return reply["sharp"]
        record = None
        for raw in response:  # server-sent events: "data: {...}" lines
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                raise _Refused(500, one_line(error.get("message", "the answer failed")), error.get("code"))
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    on_text(piece)
            record = event.get("sharp") or record
        if record is None:
            raise SharpError("the server ended the answer without its record")
        return record

"""`sharp serve` under load and at the edges: the bounded queue, clients that go away, running out
of GPU memory, stopping on SIGINT/SIGTERM, and the command's own option checks."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.pool import ThreadPool

import httpx
import openai
import pytest
from typer.testing import CliRunner

from serving import SMALL_PIXELS, LiveServer, body, video_message
from sharp_cli.cli import app


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class GatedAsk:
    """answer.ask that waits for `gate` before answering and can slow each decoded piece down;
    counts its calls and keeps what each returned."""

    def __init__(self, monkeypatch, piece_seconds=0.0):
        from sharp_cli import answer

        self.real, self.gate, self.piece_seconds = answer.ask, threading.Event(), piece_seconds
        self.calls, self.answers = 0, []
        monkeypatch.setattr(answer, "ask", self)

    def __call__(self, *args, on_text=None, **kwargs):
        self.calls += 1
        assert self.gate.wait(60)

        def slow(piece):
            time.sleep(self.piece_seconds)
            if on_text is not None:
                on_text(piece)

        result = self.real(*args, on_text=slow, **kwargs)
        self.answers.append(result)
        return result


def in_thread(fn, *args):
    out = queue.Queue()
    thread = threading.Thread(target=lambda: out.put(fn(*args)), daemon=True)
    thread.start()
    return out


def test_a_full_queue_is_a_503_and_the_queued_requests_are_answered(loaded, media, monkeypatch):
    gated = GatedAsk(monkeypatch)
    with LiveServer(loaded, media, max_queue=1) as live:
        worker = live.service.worker
        first = in_thread(live.post, body(max_tokens=2))
        wait_for(lambda: worker.busy, what="the first request to start")
        second = in_thread(live.post, body(url="wide.mp4", max_tokens=2))
        wait_for(lambda: worker.waiting == 1, what="the second request to queue")
        refused = live.post(body())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        assert refused.json()["error"]["type"] == "server_error"
        gated.gate.set()
        assert first.get(timeout=60).status_code == 200 and second.get(timeout=60).status_code == 200
        assert live.post(body(max_tokens=1)).status_code == 200  # places are given back
        assert gated.calls == 3


def test_only_a_few_videos_are_decoded_ahead_of_their_turn(loaded, media, monkeypatch):
    gated = GatedAsk(monkeypatch)
    with LiveServer(loaded, media, max_queue=8) as live:
        worker, decoded = live.service.worker, []
        real_decode = live.service.decode
        monkeypatch.setattr(live.service, "decode", lambda q: decoded.append(q) or real_decode(q))
        first = in_thread(live.post, body(max_tokens=1))
        wait_for(lambda: worker.busy, what="the first request to start")
        rest = [in_thread(live.post, body(url=url, max_tokens=1))
                for url in ("wide.mp4", "tall.mp4", "clip one.mp4", "wide.mp4")]
        wait_for(lambda: worker.waiting == 4 and len(decoded) >= 3, what="the requests to queue")
        time.sleep(0.5)
        assert len(decoded) == 1 + live.service.settings.decode_ahead  # the rest wait, frames not in memory
        gated.gate.set()
        assert all(r.get(timeout=60).status_code == 200 for r in [first, *rest]) and len(decoded) == 5


def test_a_client_that_leaves_the_queue_is_dropped(loaded, media, monkeypatch):
    gated = GatedAsk(monkeypatch)
    with LiveServer(loaded, media, max_queue=4) as live:
        worker = live.service.worker
        first = in_thread(live.post, body(max_tokens=2))
        wait_for(lambda: worker.busy, what="the first request to start")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", json=body(url="wide.mp4"), timeout=1.5)
        wait_for(lambda: worker.waiting == 0, what="the queued request to give its place back")
        gated.gate.set()
        assert first.get(timeout=60).status_code == 200
        wait_for(lambda: worker.stats["dropped"] == 1, what="the worker to drop the request")
        assert gated.calls == 1  # the model never saw the request that left


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_leaves_mid_answer_stops_the_decoding(loaded, media, monkeypatch, stream):
    gated = GatedAsk(monkeypatch, piece_seconds=0.05)
    gated.gate.set()
    with LiveServer(loaded, media) as live:
        request = body(max_tokens=400, stream=stream)
        if stream:
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=request, timeout=60) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ") and next(lines) == ""  # the role chunk
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(live.url + "/v1/chat/completions", json=request, timeout=1.5)
        wait_for(lambda: gated.answers, timeout=15, what="the answer to stop early")
        assert len(gated.answers[0].tokens) < 100
        wait_for(lambda: live.service.worker.stats["cancelled"] == 1, what="the cancel to be counted")
        assert live.post(body(max_tokens=1)).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_out_of_memory_is_a_500_with_advice_and_the_server_recovers(loaded, media, monkeypatch, stream):
    import torch

    from sharp_cli import answer

    real, emptied = answer.ask, []

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(answer, "ask", real)  # once
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(answer, "ask", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    with LiveServer(loaded, media) as live:
        response = live.post(body(stream=stream))
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "out_of_memory" and error["type"] == "server_error"
        assert error["message"].startswith("out of GPU memory; lower --frames, --max-pixels or --ratio")
        assert emptied  # the allocator's cache was given back before the next request
        assert live.post(body(max_tokens=1)).status_code == 200


def test_an_unexpected_failure_is_a_500_and_the_server_goes_on(loaded, media, monkeypatch):
    from sharp_cli import answer

    real = answer.ask

    def broken(*args, **kwargs):
        monkeypatch.setattr(answer, "ask", real)
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(answer, "ask", broken)
    with LiveServer(loaded, media) as live:
        response = live.post(body())
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert "RuntimeError: something inside broke" in response.json()["error"]["message"]
        assert live.post(body(max_tokens=1)).status_code == 200


# -- the command -----------------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--max-upload-mb", "-1"], "--max-upload-mb must be >= 0"),
    (["--media-dir", "/no/such/folder"], "--media-dir is not a folder"),
    (["--api-key", " "], "--api-key (or SHARP_API_KEY) is empty"),
    (["--ratio", "0"], "--ratio must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, "),
    (["--frames", "0"], "--frames"),
])
def test_serve_refuses_bad_options_before_loading(tiny_dir, args, message):
    result = runner.invoke(app, ["serve", "-m", str(tiny_dir), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharp: error:") and message in lines[0]


def test_serve_says_when_the_port_is_taken(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "-m", str(tiny_dir), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_second_server_on_the_same_port_fails_before_loading(tiny_dir, monkeypatch):
    """The first `sharp serve` holds its port from the start, while it loads its model: a second one
    on that port says so in one line and never loads a model."""
    from sharp_cli import loading
    from sharp_cli.serve.command import bind

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    first = bind("127.0.0.1", 0)  # what the first server holds while its model loads
    try:
        port = first.getsockname()[1]
        monkeypatch.setattr(loading, "load", never)
        result = runner.invoke(app, ["serve", "-m", str(tiny_dir), "--port", str(port)])
    finally:
        first.close()
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def start_sharp_serve(tiny_dir, media_dir, *extra, env=None):
    """`python -m sharp_cli serve` on a free port; returns (process, base URL, stderr lines so far)."""
    command = [sys.executable, "-m", "sharp_cli", "serve", "-m", str(tiny_dir), "--port", "0",
               "--media-dir", str(media_dir), "--frames", "8", "--max-pixels", str(SMALL_PIXELS), *extra]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, **(env or {})))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen = []
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", seen[-1])
        if found:
            return proc, found.group(1), lines, seen


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sharp_serve_answers_then_stops_cleanly_on_a_signal(tiny_dir, media, stop):
    proc, url, lines, seen = start_sharp_serve(tiny_dir, media, "--max-new-tokens", "3",
                                               env={"SHARP_API_KEY": "k3y", "SHARP_DEBUG": "0"})
    try:
        wait_for(lambda: httpx.get(url + "/health", headers={"Authorization": "Bearer k3y"}).status_code == 200,
                 what="/health")
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # open, without the details
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from SHARP_API_KEY
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=os.path.basename(str(tiny_dir)),
                                               messages=video_message("clip one.mp4"))
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 3
        events = queue.Queue()
        if stop == signal.SIGTERM:  # stopping while an answer streams: it ends with an error event, cleanly
            def stream():
                with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
                                  json=body(max_tokens=4000, stream=True) | {"model": None}, timeout=60) as r:
                    for line in r.iter_lines():
                        events.put(line)
                events.put(None)

            threading.Thread(target=stream, daemon=True).start()
            assert events.get(timeout=60).startswith("data: ")
        started = time.monotonic()
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    if stop == signal.SIGTERM:
        received = []
        while (line := events.get(timeout=30)) is not None:
            received.append(line)
        data = [line for line in received if line]
        assert data[-1] == "data: [DONE]" and '"shutting_down"' in data[-2]
    time.sleep(0.2)
    log = "".join(seen) + "".join(lines.get_nowait() for _ in range(lines.qsize()))
    assert "sharp serve: stopped" in log and "Traceback" not in log


def test_the_server_takes_sigint_back_from_a_native_library_that_took_it():
    """What happened on the GPU: after an answer, SIGINT was no longer Python's, and the server died
    with status 1 instead of shutting down. A C-level signal() stands in for that library here."""
    code = """
import ctypes, os, signal, time
from sharp_cli.serve.command import rearm_signal_handlers
hits = []
signal.signal(signal.SIGINT, lambda *_: hits.append(1))
ctypes.CDLL(None).signal(int(signal.SIGINT), ctypes.c_void_p(0))  # SIG_DFL behind Python's back
rearm_signal_handlers()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print(len(hits))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "1", (done.returncode, done.stderr[-500:])


def test_a_prior_cache_that_cannot_be_written_still_answers_200(loaded, media, tmp_path, monkeypatch, capfd):
    """safetensors raises its own error for a read-only or full folder, not OSError: the server
    keeps the prior in memory, says so once, and answers."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setenv("SHARP_CACHE_DIR", str(tmp_path))  # an empty cache: the prior must be written
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with LiveServer(loaded, media) as live:
        assert live.post(body(max_tokens=1)).status_code == 200
        assert live.post(body(url="wide.mp4", max_tokens=1)).status_code == 200
    err = capfd.readouterr().err
    assert err.count("cannot write the positional-prior cache") == 1 and "No space left on device" in err


def _stall(url: str, headers_done: bool) -> socket.socket:
    """A client that sends part of its request and stops: mid-headers, or mid-body."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    if headers_done:
        sock.sendall(b'Content-Length: 1000\r\n\r\n{"model": "tiny-served", "messages": [')
    return sock


def _reply(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_stalled_clients_hold_no_place_in_the_queue(loaded, media):
    """With --max-queue 1, a dozen clients stalled mid-headers or mid-body while the others ask:
    the others are answered (before, each stalled body held a place: everyone else got 503)."""
    with LiveServer(loaded, media, max_queue=1, header_seconds=120, body_idle_seconds=120) as live:
        stalled = [_stall(live.url, headers_done=i % 2 == 1) for i in range(12)]
        wait_for(lambda: live.service.worker.waiting == 0, what="the server to see them")
        for url in ("clip one.mp4", "wide.mp4", "tall.mp4"):
            assert live.post(body(url=url, max_tokens=1)).status_code == 200
        for sock in stalled:  # still stalled, still unanswered: they were there all along
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.close()


def test_stalled_clients_get_a_408_and_their_connection_closed(loaded, media):
    with LiveServer(loaded, media, header_seconds=0.5, body_idle_seconds=0.5) as live:
        mid_headers, mid_body = _stall(live.url, headers_done=False), _stall(live.url, headers_done=True)
        silent = socket.create_connection(tuple(live.url.removeprefix("http://").split(":")[:1]) +
                                          (int(live.url.rsplit(":", 1)[1]),), timeout=60)
        for sock, says in ((mid_headers, b"request headers"), (silent, b"request headers"),
                           (mid_body, b"request body")):
            reply = _reply(sock)
            assert reply.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in reply.replace(
                b'"code":"', b'"code": "') and says in reply, reply
        assert live.post(body(max_tokens=1)).status_code == 200


def test_concurrent_decord_decodes_leave_the_servers_stderr_and_exit_status(tiny_dir, tmp_path):
    """Six different videos asked about at once, decoded by decord two at a time: the server still
    logs afterwards, and SIGINT still stops it with status 0 (its stderr used to be lost here, and
    the exit status with it)."""
    from videos import make_video

    for i, width in enumerate((64, 80, 112, 128, 160, 176)):
        make_video(tmp_path / f"v{i}.mp4", n_frames=16, fps=8, size=(width, 56))
    proc, url, lines, seen = start_sharp_serve(tiny_dir, tmp_path, "--max-new-tokens", "1", "--decoder", "decord")
    try:
        with ThreadPool(6) as pool:
            codes = pool.map(lambda i: httpx.post(url + "/v1/chat/completions",
                                                  json=body(url=f"v{i}.mp4") | {"model": None},
                                                  timeout=120).status_code, range(6))
        assert codes == [200] * 6
        assert httpx.get(url + "/health").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    log = "".join(seen) + "".join(lines.get_nowait() for _ in range(lines.qsize()))
    assert "sharp serve: stopped" in log and "Traceback" not in log

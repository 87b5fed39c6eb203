"""decord under a busy CPU (sharp_cli/decord_read.py): its lost place caught, stderr watched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import HAS_DECORD
from sharp_cli.errors import VideoError
from sharp_cli.video import load_video
from videos import frame_indices, make_long_video

# ---------------------------------------------------------------- decord under a busy CPU

_STARVED = r"""
import os, subprocess, sys
sys.path.insert(0, {tests!r})
import torch  # noqa: F401  (before decord, as sharp loads them)
import decord
from videos import frame_indices
from sharp_cli.errors import VideoError
from sharp_cli.video import load_video

decoder_cpu, main_cpu = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, {{main_cpu}})
burn = ("import os, time\nos.sched_setaffinity(0, {{%d}})\nt = time.time()\n"
        "while time.time() - t < 60: pass") % decoder_cpu
burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
Real = decord.VideoReader

def starved(*args, **kwargs):
    # decord's decoder thread shares a CPU with the burners, at the lowest priority, while the
    # thread polling it has a CPU to itself: what a busy machine does to it, every time.
    before = set(os.listdir("/proc/self/task"))
    reader = Real(*args, **kwargs)
    for tid in set(os.listdir("/proc/self/task")) - before:
        os.sched_setaffinity(int(tid), {{decoder_cpu}})
        os.setpriority(os.PRIO_PROCESS, int(tid), 19)
    return reader

decord.VideoReader = starved
try:
    idx = [(2 * k + 1) * 10800 // 64 for k in range(32)]
    raw = frame_indices(starved({path!r}, ctx=decord.cpu(0), num_threads=1).get_batch(idx).asnumpy())
    print("raw wrong", sum(a != b for a, b in zip(raw, idx)), flush=True)
    os.write(2, b"--- sharp from here ---\n")
    clip = load_video({path!r}, frames=32, backend="auto")
    print("auto", clip.backend, frame_indices(clip.frames) == clip.indices, clip.notes, flush=True)
    try:
        clip = load_video({path!r}, frames=32, backend="decord")
        print("decord", frame_indices(clip.frames) == clip.indices, clip.notes)
    except VideoError as exc:
        print("decord refused:", exc)
finally:
    for b in burners:
        b.kill()
"""


@pytest.mark.skipif(not HAS_DECORD or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs decord and two CPUs to pin threads to (Linux)")
def test_decord_losing_its_place_under_load_is_caught(tmp_path_factory):
    """Reproduces decord2's silent wrong frames under CPU load (in about a second: without the
    check, sharp's auto mode returned wrong frames in 4 of 5 runs here), and checks sharp gets the
    right frames anyway: PyAV in auto mode, fresh readers or a one-line refusal with --decoder
    decord; decord's own log line stays off stderr."""
    path = tmp_path_factory.getbasetemp() / "long.mp4"
    if not path.exists():
        make_long_video(path)
    code = _STARVED.format(tests=os.path.dirname(__file__), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    raw, auto, forced = out.stdout.splitlines()
    before, after = out.stderr.split("--- sharp from here ---")
    assert after.strip() == ""  # decord's own log line is kept off stderr
    assert auto.startswith(("auto pyav True", "auto decord True []"))  # right frames, whichever decoder
    assert forced.startswith(("decord True", "decord refused:"))  # right frames, or a one-line refusal
    if raw == "raw wrong 0" and "lost its place" not in auto + forced:
        pytest.skip("the starved decoder was not reproduced on this machine")


def test_stderr_watch_passes_other_output_through(capfd):
    from sharp_cli.decord_read import watch_stderr

    with watch_stderr(b"MARKER") as seen:
        os.write(2, b"before\n[12:00:00] src.cc:1: ")
        os.write(2, b"MARKER text\nprogress 50%\r")
        os.write(2, b"[partial without end")
    assert [s.decode() for s in seen] == ["[12:00:00] src.cc:1: MARKER text"]
    assert capfd.readouterr().err == "before\nprogress 50%\r[partial without end"


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_forced_decord_retries_a_lost_place(vids, monkeypatch):
    import decord

    from sharp_cli.decord_read import ATTEMPTS

    real, calls = decord.VideoReader, []

    class Flaky:  # the first reader reports decord's skip failure (and returns shifted frames)
        def __init__(self, *args, **kwargs):
            self._r = real(*args, **kwargs)
            calls.append(self)

        def __getattr__(self, name):
            return getattr(self._r, name)

        def __len__(self):
            return len(self._r)

        def get_batch(self, indices):
            if len(calls) == 1:
                os.write(2, b"[00:00:00] video_reader.cc:711: Failed to skip frames effectively at frame 3.\n")
                return self._r.get_batch([i + 1 for i in indices])
            return self._r.get_batch(indices)

    monkeypatch.setattr(decord, "VideoReader", Flaky)
    clip = load_video(vids["h264"], frames=8, backend="decord")
    assert clip.backend == "decord" and frame_indices(clip.frames) == clip.indices and len(calls) == 2
    assert any("lost its place" in n and "read again" in n for n in clip.notes)
    calls.clear()
    monkeypatch.setattr(Flaky, "get_batch", lambda self, indices: (
        os.write(2, b"Failed to skip frames effectively\n"), self._r.get_batch(indices))[1])
    with pytest.raises(VideoError, match="lost its place"):
        load_video(vids["h264"], frames=8, backend="decord")
    assert len(calls) == ATTEMPTS
    import sharp_cli.video as video

    monkeypatch.setattr(video, "AUTO_ORDER", ("decord", "pyav"))
    clip = load_video(vids["h264"], frames=8)  # auto, decord first: PyAV at once
    assert clip.backend == "pyav" and frame_indices(clip.frames) == clip.indices
    assert any("lost its place" in n for n in clip.notes)


_OVERLAP = """
import os, threading
from sharp_cli.decord_read import watch_stderr
before, results = os.fstat(2), {}
entered, second_in = threading.Event(), threading.Event()

def first():
    with watch_stderr(b"MARK") as seen:
        entered.set()
        second_in.wait(1.0)  # the second block starts meanwhile, unless it must wait for this one
        os.write(2, b"MARK first\\n")
    results["first"] = len(seen)

def second():
    entered.wait()
    with watch_stderr(b"MARK") as seen:
        second_in.set()
        os.write(2, b"MARK second\\n")
    results["second"] = len(seen)

threads = [threading.Thread(target=first), threading.Thread(target=second)]
[t.start() for t in threads]
[t.join() for t in threads]
after = os.fstat(2)
os.write(2, b"still here\\n")
print((before.st_dev, before.st_ino) == (after.st_dev, after.st_ino), results["first"], results["second"])
"""


def test_two_threads_watching_stderr_at_once_leave_it_working():
    """serve decodes two videos at once: each watch swapped fd 2 for its own pipe, they restored each
    other's, and the process lost its stderr for good. Each block sees its own marker line, and
    fd 2 is the real stderr after both."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _OVERLAP], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1", "1"]
    assert "still here" in done.stderr and "MARK" not in done.stderr

"""The synthetic eval set (sharp_cli/evaluate/synth.py): deterministic, balanced, answers that
match the pixels, and `sharp synth`."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_jsonl, sharp
from sharp_cli.evaluate import formats, synth


# -- the synthetic set -----------------------------------------------------------------------------
def test_synth_is_deterministic_and_balanced(tmp_path):
    a = synth.write(tmp_path / "a", 8, seed=5, frames=16, size=64)
    b = synth.write(tmp_path / "b", 8, seed=5, frames=16, size=64)
    c = synth.write(tmp_path / "c", 8, seed=6, frames=16, size=64)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    items = read_jsonl(a)
    for item in items:
        assert (a.parent / item["video"]).read_bytes() == (b.parent / item["video"]).read_bytes()
        assert len(item["options"]) == 4 and item["category"] == item["id"].split("-")[0]
    for task in synth.BASIC:  # 2 questions per task: two different letters each
        letters = [i["answer"] for i in items if i["category"] == task]
        assert len(letters) == 2 and len(set(letters)) == 2
    loaded = formats.load(a)  # our own format reads it back
    assert [i.answer for i in loaded.items] == [i["answer"] for i in items]


def _colour_frames(clip, rgb) -> list[int]:
    return [t for t, f in enumerate(clip) if (np.abs(f.astype(int) - rgb).sum(axis=2) < 30).any()]


@pytest.mark.parametrize("target", range(4))
def test_synth_answers_match_the_pixels(target):
    rng = lambda: np.random.default_rng([1, target])  # noqa: E731
    clip, _, shown, wrong, boxes = synth.BUILDERS["colour"](rng(), 32, 128, target)
    flashes = _colour_frames(clip, synth.PALETTE[shown])
    assert len(flashes) == 2 and flashes[0] % 4 == 1 and flashes[1] == flashes[0] + 1
    assert [b[0] for b in boxes] == flashes  # needle boxes: the flash's frames and pixels
    for t, x0, y0, x1, y1 in boxes:
        assert x1 > x0 and y1 > y0 and (clip[t, y0:y1, x0:x1] == synth.PALETTE[shown]).all()
    assert len(_colour_frames(clip, synth.PALETTE[wrong[0]])) == 32  # the static distractor
    clip, _, first, wrong, _ = synth.BUILDERS["order"](rng(), 32, 128, target)
    assert max(_colour_frames(clip, synth.PALETTE[first])) < min(_colour_frames(clip, synth.PALETTE[wrong[0]]))
    clip, question, way, _, boxes = synth.BUILDERS["direction"](rng(), 32, 128, target)
    assert [b[0] for b in boxes] == list(range(32))  # the mover is the needle on every frame
    mover = synth.PALETTE[question.split()[-3]]
    ys, xs = zip(*[np.argwhere((np.abs(f.astype(int) - mover).sum(axis=2) < 30)).mean(axis=0) for f in clip])
    moved = {"left": xs[0] - xs[-1], "right": xs[-1] - xs[0], "up": ys[0] - ys[-1], "down": ys[-1] - ys[0]}
    assert moved[way] > 40 and max(moved.values()) == moved[way]
    clip, _, count, wrong, boxes = synth.BUILDERS["count"](rng(), 32, 128, target)
    changed = [t for t, f in enumerate(clip) if (f != clip[0]).any()]  # frame 0 never flashes
    assert sorted([*wrong, count]).index(count) == target and len(changed) == 2 * count
    assert sorted(b[0] for b in boxes) == changed


def test_synth_command(tmp_path):
    result = sharp("synth", tmp_path / "s", "--n", 2, "--seed", 3, "--frames", 8, "--size", 64, "--tasks", "count")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "s" / "items.jsonl")
    assert [i["category"] for i in read_jsonl(tmp_path / "s" / "items.jsonl")] == ["count", "count"]
    bad = sharp("synth", tmp_path / "t", "--tasks", "colour,smell")
    assert bad.exit_code == 2 and "unknown task 'smell'" in bad.stderr


def test_synth_never_overwrites_what_it_did_not_write(tmp_path):
    """A folder holding the user's items.jsonl or a video under a name the set would use is refused and
    left byte for byte; synth's own folder is written again (the README's command run twice); a file
    or an unwritable place as OUT is one line."""
    mine = tmp_path / "mine"
    (mine / "videos").mkdir(parents=True)
    (mine / "items.jsonl").write_text('{"my": "own data"}\n')
    (mine / "videos" / "count-0000.mp4").write_bytes(b"my video")
    result = sharp("synth", mine, "--n", 1, "--frames", 8, "--size", 64, "--tasks", "count")
    assert result.exit_code == 2 and "sharp synth did not write" in result.stderr
    assert (mine / "items.jsonl").read_text() == '{"my": "own data"}\n'
    assert (mine / "videos" / "count-0000.mp4").read_bytes() == b"my video"
    (mine / "items.jsonl").unlink()  # the video alone is refused too
    assert sharp("synth", mine, "--n", 1, "--frames", 8, "--size", 64, "--tasks", "count").exit_code == 2
    assert (mine / "videos" / "count-0000.mp4").read_bytes() == b"my video"

    ours = tmp_path / "ours"
    for n in (2, 1):
        again = sharp("synth", ours, "--n", n, "--frames", 8, "--size", 64, "--tasks", "count")
        assert again.exit_code == 0, again.stderr
    assert len(read_jsonl(ours / "items.jsonl")) == 1 and not list(ours.rglob("*.tmp-*"))

    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file"), ("/proc/no-such-folder", "cannot write in")):
        bad = sharp("synth", out, "--n", 1, "--frames", 8, "--size", 64)
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_no_half_clip(tmp_path, monkeypatch):
    """The disk fills while the third clip is written: one line with the system's words and what to
    do, exit 1, the clips written before kept whole, no temporary file and no items.jsonl."""
    import errno
    import os

    real = synth.write_mp4
    written = []

    def fills_up(clip, path, fps):
        if len(written) == 2:
            path.write_bytes(b"half a clip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        real(clip, path, fps)

    monkeypatch.setattr(synth, "write_mp4", fills_up)
    out = tmp_path / "s"
    result = sharp("synth", out, "--n", 4, "--frames", 8, "--size", 64)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "No space left on device" in result.stderr and "free some space and run again" in result.stderr
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["colour-0000.mp4", "direction-0001.mp4"]
    assert not (out / "items.jsonl").exists()


def test_synth_task_names_agree_with_the_command():
    from sharp_cli.evaluate import commands

    assert commands.TASKS == synth.TASKS and commands.TASK_GROUPS == tuple(synth.GROUPS)

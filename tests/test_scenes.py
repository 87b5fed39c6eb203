"""The hard `sharp synth` tasks (evaluate/scenes.py): each answer is what the pixels show."""

import numpy as np
import pytest

from sharp_cli.evaluate import scenes, synth
from sharp_cli.evaluate.diagnose import profile_shape, row_stats

FRAMES, SIZE = 48, 112


def _near(pixels, rgb, tol=30):
    return np.abs(pixels.astype(int) - np.array(rgb)).sum(-1) < tol


def _build(task, target, seed=0):
    return scenes.BUILDERS[task](np.random.default_rng([seed, target]), FRAMES, SIZE, target)


@pytest.mark.parametrize("target", range(4))
def test_flash_boxes_show_the_answer_for_four_frames(target):
    video, _, answer, wrong, boxes, _ = _build("flash", target)
    colour, shape = answer.split()
    frames = [b[0] for b in boxes]
    assert frames == list(range(frames[0], frames[0] + scenes.FLASH)) and frames[0] % 2 == 0
    for t, x0, y0, x1, y1 in boxes:
        assert _near(video[t, y0:y1, x0:x1], scenes.PALETTE[colour]).mean() > 0.3
    assert answer not in wrong and len(set(wrong)) == 3


@pytest.mark.parametrize("target", range(4))
def test_sequence_order_is_the_order_of_the_flashes(target):
    video, _, answer, wrong, boxes, _ = _build("sequence", target)
    colours = answer.split()
    first_seen = []
    for colour in colours:
        hits = [t for t in range(FRAMES) for (f, x0, y0, x1, y1) in boxes
                if f == t and _near(video[t, y0:y1, x0:x1], scenes.PALETTE[colour]).mean() > 0.3]
        first_seen.append(min(hits))
    assert first_seen == sorted(first_seen) and len(set(first_seen)) == 3
    assert all(sorted(w.split()) == sorted(colours) and w != answer for w in wrong)


@pytest.mark.parametrize("target", range(4))
def test_scene_count_is_the_number_of_cuts_plus_one(target):
    video, _, answer, _, boxes, clip = _build("scenes", target)
    assert answer == target + 1 == len(clip.starts) and boxes == []
    step = [np.abs(video[t].astype(int) - video[t - 1]).mean() for t in range(1, FRAMES)]
    cuts = [t for t in clip.starts[1:]]
    for t in cuts:  # a cut changes the frame far more than the camera's motion does
        assert step[t - 1] > 3 * np.median(step)


@pytest.mark.parametrize("target", range(4))
def test_motion_direction_is_the_mover_on_screen(target):
    video, question, way, _, boxes, clip = _build("motion", target)
    assert clip.cameras[0].kind in ("pan", "zoom")
    xs = [(b[1] + b[3]) / 2 for b in boxes]
    ys = [(b[2] + b[4]) / 2 for b in boxes]
    moved = {"left": xs[0] - xs[-1], "right": xs[-1] - xs[0], "up": ys[0] - ys[-1], "down": ys[-1] - ys[0]}
    assert max(moved, key=moved.get) == way and moved[way] > SIZE / 3


@pytest.mark.parametrize("target", range(4))
def test_objects_count_every_object_drawn(target):
    video, _, count, wrong, boxes, clip = _build("objects", target)
    assert len(clip.objects) == count and count not in wrong
    assert sorted([*wrong, count]).index(count) == target


@pytest.mark.parametrize("target", range(4))
def test_dominant_colour_is_on_screen_longest(target):
    video, _, answer, wrong, _, clip = _build("dominant", target)
    frames_seen = {c: sum(_near(f, scenes.PALETTE[c]).any() for f in video) for c in [answer, *wrong]}
    assert max(frames_seen, key=frames_seen.get) == answer


def test_a_panning_camera_moves_the_background_and_a_static_one_does_not():
    for kind, moves in (("pan", True), ("zoom", True), ("static", False)):
        clip = scenes.Clip(np.random.default_rng(7), FRAMES, SIZE, scenes=1, camera=kind)
        video, _ = clip.render()
        assert (np.abs(video[-1].astype(int) - video[0]).mean() > 5) == moves, kind


def test_hard_items_are_deterministic_and_balanced(tmp_path):
    a = synth.write(tmp_path / "a", 12, seed=3, frames=32, size=64, tasks=("hard",))
    b = synth.write(tmp_path / "b", 12, seed=3, frames=32, size=64, tasks=("hard",))
    assert a.read_bytes() == b.read_bytes()
    import json

    items = [json.loads(line) for line in a.read_text().splitlines()]
    assert [i["category"] for i in items[:6]] == list(scenes.BUILDERS)
    for item in items:
        assert item["camera"] in scenes.CAMERAS and item["scene_starts"][0] == 0
        assert item["needle_frames"] == sorted({box[0] for box in item["needle_boxes"]})


def test_hard_tasks_need_room(tmp_path):
    from sharp_cli.errors import UsageError

    with pytest.raises(UsageError, match="--frames must be >= 32"):
        synth.write(tmp_path, 2, frames=16, tasks=("flash",))
    with pytest.raises(UsageError, match="unknown task"):
        synth.write(tmp_path, 2, tasks=("nope",))


def test_attention_statistics_on_known_distributions():
    import torch

    frames, per = 8, 4  # 32 visual tokens after 3 text tokens
    visual, sink = torch.arange(3, 35), torch.arange(0, 2)
    uniform = torch.full((2, 36), 1 / 36)
    s = row_stats(uniform, visual, frames, sink)
    assert s["entropy"] == pytest.approx(1.0) and s["zeros"] == 0 and s["top1"] == pytest.approx(1 / 32)
    assert s["sink"] == pytest.approx(2 / 36)
    onehot = torch.zeros(2, 36)
    onehot[:, 34] = 1.0  # the last visual token: last frame
    s = row_stats(onehot, visual, frames, sink)
    assert s["entropy"] == pytest.approx(0.0, abs=1e-6) and s["top1"] == 1 and s["recency"] == 1
    assert s["zeros"] == pytest.approx(31 / 32)
    early = torch.zeros(2, 36)
    early[:, 3:3 + per] = 0.25  # all on the first frame
    assert row_stats(early, visual, frames, sink)["recency"] == 0
    shape = profile_shape([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 20.0])
    assert shape["spearman"] == pytest.approx(1.0) and shape["last_eighth"] == pytest.approx(20 / 48)

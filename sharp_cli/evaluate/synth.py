"""`sharp synth`: small videos whose answer hangs on a few visual tokens, for pruning evals.

Every clip is a static textured background (a small tile repeated: many near-duplicate
tokens, and every frame a near-copy of the others) with static distractor discs and a small
black-and-white checkerboard "logo" in one corner (high-contrast pixels, the kind that gives a
few high-norm tokens), plus what the question is about:

    colour     a small square flashes for two frames; which colour? (a static disc of one of
               the wrong options' colours is on screen the whole time)
    direction  a coloured square moves steadily left, right, up or down; which way?
    order      two squares of different colours flash at different times; which came first?
    count      1 to 5 squares flash at different times and places; how many?

A flash covers frames 4k+1 and 4k+2, so uniform sampling of 8, 16 or 32 frames from a
32-frame clip always sees it. Flashes are placed uniformly over the clip, so about half of them
fall in its middle half, away from the ends that shallow attention favours; every item records
`needle_frames` (the frames that differ from the first), `needle_boxes` (every drawn box that shows
the answer, as [frame, x0, y0, x1, y1] in the clip's pixels, end-exclusive: what needle recall@k in
`sharp eval` maps onto visual tokens) and, for colour, `needle_part` (start, middle or end third), so
accuracy can be broken down by where the needle is (`sharp eval --category-field needle_part`).
Options are 4 per question; the correct letter cycles through a random order of A-D every 4
questions of a task, so letters are balanced.
Everything derives from (seed, item number): the same seed writes the same files.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from sharp_cli.errors import UsageError
from sharp_cli.evaluate import scenes
from sharp_cli.letters import LETTERS
from sharp_cli.options import atomic_path, write_atomic

BASIC = ("colour", "direction", "order", "count")
HARD = tuple(scenes.BUILDERS)  # moving camera, textures, cuts, coverage: scenes.py
TASKS = BASIC + HARD
GROUPS = {"basic": BASIC, "hard": HARD, "all": TASKS}  # names --tasks accepts besides the tasks
PALETTE = {
    "red": (220, 30, 30), "green": (30, 175, 45), "blue": (35, 70, 230), "yellow": (240, 215, 25),
    "orange": (245, 130, 15), "purple": (140, 50, 200), "cyan": (25, 200, 215), "pink": (245, 120, 190),
}
NEUTRALS = ((250, 250, 250), (15, 15, 15), (70, 70, 70), (190, 190, 190))
DIRECTIONS = ("left", "right", "up", "down")
TILE = 16  # background tile, pixels
OPTIONS = 4


def expand_tasks(names) -> tuple[str, ...]:
    """Task names and group names (basic, hard, all) -> task names, in order, without repeats."""
    tasks = tuple(dict.fromkeys(t for name in names for t in GROUPS.get(name, (name,))))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task '{(unknown or [''])[0]}'; choose from {', '.join(TASKS)} "
                         f"or a group: {', '.join(GROUPS)}")
    return tasks


def write(out: str | Path, n: int, seed: int = 0, *, frames: int = 32, size: int = 128, fps: float = 8.0,
          tasks: tuple[str, ...] = BASIC, progress=None) -> Path:
    """Write n clips under OUT/videos and their questions to OUT/items.jsonl; returns that file."""
    tasks = prepare(out, n, seed, frames=frames, size=size, tasks=tasks)
    out = Path(out)
    lines = []
    for i in range(n):
        clip, item = make_item(seed, i, tasks, frames, size)
        with atomic_path(out / "videos" / f"{item['id']}.mp4") as part:  # a whole clip or none
            write_mp4(clip, Path(part), fps)
        rest = {k: v for k, v in item.items() if k != "id"}
        lines.append({"id": item["id"], "video": f"videos/{item['id']}.mp4", **rest})
        if progress is not None:
            progress()
    items = out / "items.jsonl"
    write_atomic(items, "".join(json.dumps(line) + "\n" for line in lines))
    return items


def prepare(out: str | Path, n: int, seed: int = 0, *, frames: int = 32, size: int = 128,
            tasks: tuple[str, ...] = BASIC) -> tuple[str, ...]:
    """Check the arguments and claim OUT (below) before any clip is made; returns the tasks by name."""
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    tasks = expand_tasks(tasks)
    least = 32 if set(tasks) & set(HARD) else 8
    if frames < least:
        raise UsageError(f"--frames must be >= {least} for these tasks (flashes and cuts need room), got {frames}")
    if size < 64 or size % 2:
        raise UsageError(f"--size must be even and >= 64, got {size}")
    out = Path(out)
    claim(out, [out / "videos" / f"{make_id(seed, i, tasks)}.mp4" for i in range(n)])
    return tasks


MARK = ".sharp-synth"  # in a folder sharp synth writes: its files there may be written again


def claim(out: Path, videos: list[Path]) -> None:
    """Make `out` sharp synth's folder, or refuse in one line: a file of the user's (an items.jsonl or
    a video under a name this set would write, in a folder synth did not make) is never overwritten."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"'{out}' is a file; sharp synth writes a folder (videos/ and items.jsonl)")
    if not (out / MARK).exists() and not _written_by_synth(out / "items.jsonl"):
        taken = [p for p in [out / "items.jsonl", *videos] if p.exists()]
        if taken:
            raise UsageError(f"'{out}' already holds {taken[0]}{' and more' if len(taken) > 1 else ''}, which sharp "
                             "synth did not write; choose a new or empty folder")
    try:
        (out / "videos").mkdir(parents=True, exist_ok=True)
        (out / MARK).write_text("written by sharp synth: its files here may be rewritten\n")
    except OSError as e:
        raise UsageError(f"cannot write in '{out}': {e.strerror or e}") from None


def _written_by_synth(items: Path) -> bool:
    """An items.jsonl of an earlier sharp synth (before the mark): its first line has synth's fields."""
    try:
        with items.open() as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and {"id", "video", "question", "options", "answer", "needle_frames"} <= set(first)


def make_id(seed: int, i: int, tasks: tuple[str, ...]) -> str:
    """Item i's id (and its video's name): its task and number, the same for every seed."""
    return f"{tasks[i % len(tasks)]}-{i:04d}"


def make_item(seed: int, i: int, tasks: tuple[str, ...] = BASIC, frames: int = 32, size: int = 128):
    """Item i of the set of `seed`, in memory: (frames (T, H, W, 3) uint8, {id, question, options,
    answer, category, needle_frames, needle_part, needle_boxes, and for the hard tasks camera and
    scene_starts})."""
    task = tasks[i % len(tasks)]
    nth = i // len(tasks)  # how many questions of this task came before
    block = np.random.default_rng([seed, TASKS.index(task), nth // OPTIONS, 1])
    target = int(block.permutation(OPTIONS)[nth % OPTIONS])
    rng = np.random.default_rng([seed, i, 0])
    built = {**BUILDERS, **scenes.BUILDERS}[task](rng, frames, size, target)
    clip, question, correct, wrong, boxes = built[:5]
    if isinstance(correct, int):  # counts stay in order; the count was chosen to land on `target`
        options = [str(o) for o in sorted([*wrong, correct])]
    else:
        options = [str(wrong[j]) for j in rng.permutation(len(wrong))]
        options.insert(target, str(correct))
    if task in HARD:  # the camera moves: what shows the answer is what was drawn, not what changed
        moved = sorted({b[0] for b in boxes})
    else:
        moved = [t for t in range(1, len(clip)) if (clip[t] != clip[0]).any()]
    part = None
    if task in ("colour", "flash") and moved:
        part = ("start", "middle", "end")[min(2, 3 * moved[0] // len(clip))]
    item = {"id": make_id(seed, i, tasks), "question": question, "options": options,
            "answer": LETTERS[options.index(str(correct))], "category": task,
            "needle_frames": moved, "needle_part": part, "needle_boxes": boxes}
    if task in HARD:
        scene = built[5]
        item.update(camera=scene.cameras[0].kind, scene_starts=scene.starts)
    return clip, item


# -- scenes ----------------------------------------------------------------------------------------
def _scene(rng, frames: int, size: int) -> np.ndarray:
    """Static muted texture (one tile repeated) with 3-5 neutral discs, as (T, H, W, 3) uint8."""
    grey = rng.uniform(95, 150)
    tile = grey + rng.normal(0, 18, (TILE, TILE, 1)) + rng.normal(0, 6, (TILE, TILE, 3))
    reps = -(-size // TILE)
    frame = np.tile(np.clip(tile, 0, 255), (reps, reps, 1))[:size, :size].astype(np.uint8)
    for _ in range(int(rng.integers(3, 6))):
        _disc(frame, rng.uniform(0.1, 0.9, 2) * size, size / 22, NEUTRALS[int(rng.integers(len(NEUTRALS)))])
    _logo(frame, int(rng.integers(4)))
    return np.repeat(frame[None], frames, axis=0)


def _logo(frame: np.ndarray, corner: int) -> None:
    """A 4x4 black-and-white checkerboard, 1/8 of the frame wide, 2 px in from one corner (what
    is drawn later, a needle included, goes over it)."""
    size = frame.shape[0]
    side = max(8, size // 8) // 4 * 4
    cells = (np.indices((side, side)) // (side // 4)).sum(axis=0) % 2
    y = 2 if corner < 2 else size - side - 2
    x = 2 if corner % 2 == 0 else size - side - 2
    frame[y:y + side, x:x + side] = np.where(cells[..., None] == 1, 255, 0).astype(np.uint8)


def _disc(frame: np.ndarray, centre, radius: float, colour) -> None:
    ys, xs = np.ogrid[: frame.shape[0], : frame.shape[1]]
    frame[(ys - centre[1]) ** 2 + (xs - centre[0]) ** 2 <= radius**2] = colour


def _square(frame: np.ndarray, x: float, y: float, side: int, colour) -> list[int]:
    """Draw a side x side square at (x, y); returns its box [x0, y0, x1, y1] clipped to the frame."""
    x0, y0 = int(round(x)), int(round(y))
    frame[max(y0, 0): max(y0 + side, 0), max(x0, 0): max(x0 + side, 0)] = colour
    height, width = frame.shape[:2]
    return [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x0 + side, 0), width),
            min(max(y0 + side, 0), height)]


def _side(size: int) -> int:
    return max(6, size // 11)


def _spot(rng, size: int):
    side = _side(size)
    return rng.uniform(0.05 * size, 0.95 * size - side, 2)


def _flash(clip: np.ndarray, slot: int, xy, colour) -> list[list[int]]:
    """A square on frames 4*slot+1 and 4*slot+2 only; returns its [frame, x0, y0, x1, y1] boxes."""
    return [[t, *_square(clip[t], xy[0], xy[1], _side(clip.shape[1]), colour)] for t in (4 * slot + 1, 4 * slot + 2)]


def _colours(rng, k: int) -> list[str]:
    return [list(PALETTE)[j] for j in rng.permutation(len(PALETTE))[:k]]


def _slots(frames: int) -> int:
    return frames // 4


def _colour_task(rng, frames, size, target):
    clip = _scene(rng, frames, size)
    shown, static, *others = _colours(rng, 4)
    still = rng.uniform(0.15, 0.85, 2) * size
    for frame in clip:
        _disc(frame, still, size / 14, PALETTE[static])
    boxes = _flash(clip, int(rng.integers(_slots(frames))), _spot(rng, size), PALETTE[shown])
    question = "A small square flashes for a moment somewhere in the video. What colour is it?"
    return clip, question, shown, [static, *others], boxes


def _direction_task(rng, frames, size, target):
    clip = _scene(rng, frames, size)
    mover, still_colour = _colours(rng, 2)
    way = DIRECTIONS[int(rng.integers(4))]
    side = _side(size)
    travel = np.linspace(0.1 * size, 0.9 * size - side, frames)
    if way in ("left", "up"):
        travel = travel[::-1]
    across = rng.uniform(0.1 * size, 0.9 * size - side)
    still = _spot(rng, size)
    boxes = []
    for t, frame in enumerate(clip):
        _square(frame, still[0], still[1], side, PALETTE[still_colour])
        x, y = (travel[t], across) if way in ("left", "right") else (across, travel[t])
        boxes.append([t, *_square(frame, x, y, side, PALETTE[mover])])
    question = f"Which way does the {mover} square move?"
    return clip, question, way, [d for d in DIRECTIONS if d != way], boxes


def _order_task(rng, frames, size, target):
    clip = _scene(rng, frames, size)
    first, second, *others = _colours(rng, 4)
    early, late = sorted(rng.choice(_slots(frames), 2, replace=False))
    boxes = _flash(clip, int(early), _spot(rng, size), PALETTE[first])
    boxes += _flash(clip, int(late), _spot(rng, size), PALETTE[second])
    question = "Two small squares of different colours flash briefly, one after the other. What colour is the first?"
    return clip, question, first, [second, *others], boxes


def _count_task(rng, frames, size, target):
    clip = _scene(rng, frames, size)
    count = min(target + 1 + int(rng.integers(2)), _slots(frames))
    lowest = max(1, count - target)  # options are lowest..lowest+3, the answer at letter `target`
    boxes = []
    for slot in rng.choice(_slots(frames), count, replace=False):
        boxes += _flash(clip, int(slot), _spot(rng, size), PALETTE[_colours(rng, 1)[0]])
    question = "Small squares flash briefly at different moments. How many flashes are there?"
    wrong = [n for n in range(lowest, lowest + OPTIONS) if n != count]
    return clip, question, count, wrong, boxes


BUILDERS = {"colour": _colour_task, "direction": _direction_task, "order": _order_task, "count": _count_task}


def write_mp4(clip: np.ndarray, path: Path, fps: float) -> None:
    """H.264, near-lossless, single-threaded (so the bytes depend on the frames alone)."""
    import av

    with av.open(str(path), "w", format="mp4") as out:  # the format named: the name may be a temporary one
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                options={"preset": "ultrafast", "crf": "12", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for t, pixels in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = t
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))

"""The harder `sharp synth` tasks: textured worlds seen by a moving camera, with scene cuts.

The basic tasks (synth.py) keep the camera still on a tiled background, so every frame is a near
copy of the first and a needle is exactly what changed: easy for same-position deduplication and
for a model that only has to spot a difference. Here a clip is 1-4 scenes (cuts between them), each
a large textured canvas (gratings, blobs and noise, muted colours) seen through a camera window
that stays, pans or zooms. Objects live in the canvas's coordinates, so they move with the camera;
each frame is the window resampled (nearest neighbour) to size x size, objects drawn on it at their
projected place and size. Tasks:

    flash     a small object flashes for 4 frames; which colour and shape? ("red disc": 2 words)
    sequence  3 objects of different colours flash one after another; in what order? (3 words)
    objects   1-5 objects each appear for a while, at different times; how many?
    dominant  large patches of 3 colours come and go; which colour is on screen the most?
    motion    a square moves left, right, up or down on the screen while the camera moves
    scenes    how many scenes (1-4) does the video show?

Every item records `needle_boxes` ([frame, x0, y0, x1, y1], screen pixels, end-exclusive) for what
shows the answer (none for `scenes`, whose answer is everywhere) and `camera` (the first scene's
camera: static, pan or zoom), so accuracy can be broken down by camera motion.
"""

from __future__ import annotations

import numpy as np

PALETTE = {
    "red": (220, 30, 30), "green": (30, 175, 45), "blue": (35, 70, 230), "yellow": (240, 215, 25),
    "orange": (245, 130, 15), "purple": (140, 50, 200), "cyan": (25, 200, 215), "pink": (245, 120, 190),
}
SHAPES = ("square", "disc", "cross", "bar")
DIRECTIONS = ("left", "right", "up", "down")
CAMERAS = ("static", "pan", "zoom")
OPTIONS = 4
FLASH = 4  # frames a flash lasts, starting on an even frame: two whole token frames at 2 frames each


class Camera:
    """Where the window of one scene sits on its canvas at each frame: origin (x, y) and side."""

    def __init__(self, rng, canvas: int, size: int, frames: int, kind: str):
        self.kind = kind
        side0 = side1 = size
        if kind == "zoom":  # in or out, to 0.6 of the canvas window
            side0, side1 = (size, int(0.6 * size)) if rng.random() < 0.5 else (int(0.6 * size), size)
        travel = canvas - max(side0, side1)
        start = rng.uniform(0, travel, 2)
        end = start.copy()
        if kind == "pan":  # up to the whole free travel, in any direction
            end = rng.uniform(0, travel, 2)
            while np.abs(end - start).max() < 0.3 * travel:
                end = rng.uniform(0, travel, 2)
        steps = np.linspace(0.0, 1.0, max(frames, 2))[:frames]
        self.sides = side0 + (side1 - side0) * steps
        centre0, centre1 = start + side0 / 2, end + side1 / 2  # zoom keeps the centre moving linearly
        centres = centre0[None] + (centre1 - centre0)[None] * steps[:, None]
        self.origins = centres - self.sides[:, None] / 2

    def project(self, t: int, x: float, y: float, size: int) -> tuple[float, float, float]:
        """Canvas point -> screen point and scale (screen pixels per canvas pixel) at frame t."""
        scale = size / self.sides[t]
        return (x - self.origins[t, 0]) * scale, (y - self.origins[t, 1]) * scale, scale

    def view(self, canvas: np.ndarray, t: int, size: int) -> np.ndarray:
        """Frame t's window resampled to size x size (nearest neighbour)."""
        grid = (np.arange(size) + 0.5) * (self.sides[t] / size)
        xs = np.clip((self.origins[t, 0] + grid).astype(np.int64), 0, canvas.shape[1] - 1)
        ys = np.clip((self.origins[t, 1] + grid).astype(np.int64), 0, canvas.shape[0] - 1)
        return canvas[ys[:, None], xs[None, :]]


def texture(rng, side: int) -> np.ndarray:
    """A muted textured canvas (side, side, 3) uint8: two gratings, soft blobs, fine noise, and a
    few neutral discs; grey-ish so the palette's saturated colours stand out."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    base = rng.uniform(90, 150)
    img = np.full((side, side), base, np.float32)
    for _ in range(2):
        angle, period = rng.uniform(0, np.pi), rng.uniform(8, 40)
        img += rng.uniform(8, 20) * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period
                                           + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(side / 16, side / 5)
        img += rng.uniform(-35, 35) * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
    tint = rng.uniform(-12, 12, 3).astype(np.float32)
    rgb = img[..., None] + tint[None, None] + rng.normal(0, 5, (side, side, 3)).astype(np.float32)
    for _ in range(int(rng.integers(4, 9))):  # neutral clutter: white, black, greys
        grey = float(rng.choice([245.0, 20.0, 70.0, 190.0]))
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(side / 40, side / 18)
        rgb[(xs - cx) ** 2 + (ys - cy) ** 2 <= r * r] = grey
    return np.clip(rgb, 0, 255).astype(np.uint8)


def draw(frame: np.ndarray, shape: str, x: float, y: float, side: float, colour) -> list[int] | None:
    """Draw `shape` with its box's top-left at screen (x, y), `side` pixels wide; returns the
    drawn box [x0, y0, x1, y1] clipped to the frame, or None when nothing of it is on screen."""
    size_y, size_x = frame.shape[:2]
    x0, y0 = int(round(x)), int(round(y))
    s = max(3, int(round(side)))
    x1, y1 = x0 + s, y0 + (max(2, s // 3) if shape == "bar" else s)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size_x), min(y1, size_y)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    ys, xs = np.ogrid[cy0:cy1, cx0:cx1]
    u, v = (xs - x0 + 0.5) / s, (ys - y0 + 0.5) / s  # 0..1 inside the object's box
    if shape == "disc":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "cross":
        mask = (np.abs(u - 0.5) < 0.18) | (np.abs(v - 0.5) < 0.18)
    else:  # square, bar
        mask = np.ones((cy1 - cy0, cx1 - cx0), bool)
    region = frame[cy0:cy1, cx0:cx1]
    region[mask] = colour
    return [cx0, cy0, cx1, cy1]


class Clip:
    """1-4 scenes, each a canvas and a camera; objects placed in scene (canvas) coordinates."""

    def __init__(self, rng, frames: int, size: int, scenes: int | None = None, camera: str | None = None):
        self.frames, self.size, self.canvas_side = frames, size, 2 * size
        count = scenes if scenes is not None else (1 if rng.random() < 0.5 else int(rng.integers(2, 4)))
        cuts = sorted(rng.choice(np.arange(4, frames - 3, 2), count - 1, replace=False).tolist()) if count > 1 else []
        self.starts = [0, *cuts]
        self.ends = [*cuts, frames]
        self.canvases, self.cameras = [], []
        for n, (a, b) in enumerate(zip(self.starts, self.ends)):
            kind = camera if (camera and n == 0) else CAMERAS[int(rng.integers(len(CAMERAS)))]
            self.canvases.append(texture(rng, self.canvas_side))
            self.cameras.append(Camera(rng, self.canvas_side, size, b - a, kind))
        self.objects: list[tuple] = []  # (first frame, end frame, shape, colour, x, y, side) in canvas pixels

    def scene_of(self, t: int) -> int:
        return max(n for n, a in enumerate(self.starts) if a <= t)

    def place(self, rng, t: int, side: float) -> tuple[float, float]:
        """A canvas point for an object at frame t, inside the camera's view at t (with margin)."""
        n = self.scene_of(t)
        cam, local = self.cameras[n], t - self.starts[n]
        view = cam.sides[local]
        ox, oy = cam.origins[local]
        margin = 0.08 * view
        return (float(rng.uniform(ox + margin, ox + view - margin - side)),
                float(rng.uniform(oy + margin, oy + view - margin - side)))

    def add(self, first: int, end: int, shape: str, colour: str, xy, side: float) -> int:
        self.objects.append((first, end, shape, colour, xy[0], xy[1], side))
        return len(self.objects) - 1

    def render(self) -> tuple[np.ndarray, dict[int, list[list[int]]]]:
        """(T, size, size, 3) uint8 and, per object, its on-screen boxes [frame, x0, y0, x1, y1]."""
        out = np.empty((self.frames, self.size, self.size, 3), np.uint8)
        boxes: dict[int, list[list[int]]] = {i: [] for i in range(len(self.objects))}
        for t in range(self.frames):
            n = self.scene_of(t)
            cam, local = self.cameras[n], t - self.starts[n]
            out[t] = cam.view(self.canvases[n], local, self.size)
            for i, (first, end, shape, colour, x, y, side) in enumerate(self.objects):
                if first <= t < end and self.scene_of(first) == n:
                    sx, sy, scale = cam.project(local, x, y, self.size)
                    box = draw(out[t], shape, sx, sy, side * scale, PALETTE[colour])
                    if box is not None:
                        boxes[i].append([t, *box])
        return out, boxes


def _colours(rng, k: int) -> list[str]:
    return [list(PALETTE)[j] for j in rng.permutation(len(PALETTE))[:k]]


def _flash_start(rng, clip: Clip, taken=()) -> int:
    """An even frame where a FLASH-frame flash stays inside one scene, away from `taken` starts."""
    starts = [t for t in range(0, clip.frames - FLASH + 1, 2)
              if clip.scene_of(t) == clip.scene_of(t + FLASH - 1) and all(abs(t - u) >= FLASH for u in taken)]
    return int(rng.choice(starts))


def _side(size: int) -> float:
    return size / 8


def flash_task(rng, frames, size, target):
    clip = Clip(rng, frames, size)
    colours = _colours(rng, 4)
    shapes = [SHAPES[j] for j in rng.permutation(len(SHAPES))]
    answer = f"{colours[0]} {shapes[0]}"
    # Distractors on screen the whole time: the answer's colour in another shape, and another colour
    # in the answer's shape, so neither word alone gives it away.
    wrong = [f"{colours[0]} {shapes[1]}", f"{colours[1]} {shapes[0]}", f"{colours[2]} {shapes[2]}"]
    for text in wrong[:2]:
        colour, shape = text.split()
        for n, (a, b) in enumerate(zip(clip.starts, clip.ends)):
            clip.add(a, b, shape, colour, clip.place(rng, a, _side(size)), _side(size))
    t = _flash_start(rng, clip)
    needle = clip.add(t, t + FLASH, shapes[0], colours[0], clip.place(rng, t, _side(size)), _side(size))
    video, boxes = clip.render()
    question = "A small object flashes for a moment somewhere in the video. What colour and shape is it?"
    return video, question, answer, wrong, boxes[needle], clip


def sequence_task(rng, frames, size, target):
    clip = Clip(rng, frames, size)
    colours = _colours(rng, 3)
    starts: list[int] = []
    for _ in colours:
        starts.append(_flash_start(rng, clip, starts))
    starts.sort()
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    needles = [clip.add(t, t + FLASH, shape, c, clip.place(rng, t, _side(size)), _side(size))
               for t, c in zip(starts, colours)]
    video, boxes = clip.render()
    orders = [colours[:]]
    while len(orders) < OPTIONS:
        other = [colours[j] for j in rng.permutation(3)]
        if other not in orders:
            orders.append(other)
    question = "Three objects of different colours flash one after another. In what order do the colours appear?"
    return video, question, " ".join(orders[0]), [" ".join(o) for o in orders[1:]], \
        [b for i in needles for b in boxes[i]], clip


def objects_task(rng, frames, size, target):
    clip = Clip(rng, frames, size)
    count = int(np.clip(target + 1 + rng.integers(2), 1, 5))
    lowest = max(1, count - target)  # options lowest..lowest+3, the answer at letter `target`
    span = max(8, frames // 4)
    needles = []
    for _ in range(count):
        first = int(rng.integers(0, frames - span + 1)) // 2 * 2
        first = clip.starts[clip.scene_of(first)] if clip.scene_of(first) != clip.scene_of(first + span - 1) else first
        end = min(first + span, clip.ends[clip.scene_of(first)])
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], _colours(rng, 1)[0]
        needles.append(clip.add(first, end, shape, colour, clip.place(rng, first, _side(size)), _side(size)))
    video, boxes = clip.render()
    question = "Objects appear one at a time or together for a while. How many objects appear in the video?"
    wrong = [n for n in range(lowest, lowest + OPTIONS) if n != count]
    return video, question, count, wrong, [b for i in needles for b in boxes[i]], clip


def dominant_task(rng, frames, size, target):
    clip = Clip(rng, frames, size, camera="static")
    colours = _colours(rng, 4)
    # Screen time (frames) per colour: the answer's at least 1.5 times any other's.
    share = np.array([rng.uniform(0.45, 0.7), rng.uniform(0.12, 0.28), rng.uniform(0.12, 0.28)])
    needles = {c: [] for c in colours[:3]}
    side = size / 3
    for c, part in zip(colours[:3], share):
        left = int(part * frames)
        while left >= 2:
            run = min(left, int(rng.integers(4, 12)))
            first = int(rng.integers(0, frames - run + 1))
            end = min(first + run, clip.ends[clip.scene_of(first)])
            needles[c].append(clip.add(first, end, "square", c, clip.place(rng, first, side), side))
            left -= end - first
    video, boxes = clip.render()
    seen = {c: sum(len(boxes[i]) for i in ids) for c, ids in needles.items()}
    answer = max(seen, key=seen.get)
    wrong = [c for c in colours if c != answer][:3]
    question = "Large coloured squares come and go. Which colour is on screen for the longest time?"
    return video, question, answer, wrong, [b for i in needles[answer] for b in boxes[i]], clip


def motion_task(rng, frames, size, target):
    clip = Clip(rng, frames, size, scenes=1, camera=("pan", "zoom")[int(rng.integers(2))])
    mover = _colours(rng, 1)[0]
    way = DIRECTIONS[int(rng.integers(4))]
    video, _ = clip.render()
    side = _side(size)
    travel = np.linspace(0.1 * size, 0.9 * size - side, frames)
    if way in ("left", "up"):
        travel = travel[::-1]
    across = rng.uniform(0.1 * size, 0.9 * size - side)
    boxes = []
    for t in range(frames):  # screen coordinates: the mover's motion is the question's
        x, y = (travel[t], across) if way in ("left", "right") else (across, travel[t])
        boxes.append([t, *draw(video[t], "square", x, y, side, PALETTE[mover])])
    question = f"The camera moves too. Which way does the {mover} square move on the screen?"
    return video, question, way, [d for d in DIRECTIONS if d != way], boxes, clip


def scenes_task(rng, frames, size, target):
    clip = Clip(rng, frames, size, scenes=target + 1)  # options 1..4: the answer at letter `target`
    video, _ = clip.render()
    question = "The video may cut from one scene to another. How many different scenes does it show?"
    return video, question, target + 1, [n for n in range(1, OPTIONS + 1) if n != target + 1], [], clip


BUILDERS = {"flash": flash_task, "sequence": sequence_task, "objects": objects_task, "dominant": dominant_task,
            "motion": motion_task, "scenes": scenes_task}

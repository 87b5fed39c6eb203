"""Which video decoder `--decoder auto` should try first: decord2 and PyAV timed on the same clips.

Clips are encoded here with PyAV (H.264, yuv420p), so the run needs no files: a short one (the
README's synthetic 128x128 clip: 32 frames at 8 fps), a 4-second 640x360 one, a long one (20
minutes of 320x180 at 10 fps, a keyframe every 10 s), an HD one (10 s of 1920x1080 at 30 fps) and a
seek-heavy one (60 s of 640x360 at 30 fps with one keyframe every 300 frames, so every sampled
frame needs up to 299 frames decoded before it). Each is sampled the way `sharp ask` samples it:
32 frames, decoded no larger than Qwen2.5-VL's per-frame budget (602,112 pixels), through
sharp_cli.video.load_video with --decoder decord and --decoder pyav; the median of --repeats runs
(after one untimed run per clip and decoder) is reported, and both decoders must return the same
frame indices. For the README clip it also times the first call in a fresh process, which is
what a one-off `sharp ask` pays (the decoder's libraries load on first use).

    python -m scripts.decoder_bench                      # table on stdout
    python -m scripts.decoder_bench --json out.json --repeats 7 --clips /tmp/decoder-clips

Machine load changes every figure: run it on an idle machine, and read `load` in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tests.videos import make_video  # the tests' PyAV encoder: frames that say their index

BUDGET = 602_112  # Qwen2.5-VL's per-frame bound at 32 frames (768 tokens of 28x28 pixels)
# name: (frames, fps, (width, height), keyframe interval in frames)
CLIPS = {
    "readme-128px": (32, 8, (128, 128), None),
    "short-360p": (120, 30, (640, 360), None),
    "long-20min": (12_000, 10, (320, 180), 100),
    "hd-1080p": (300, 30, (1920, 1080), None),
    "seek-heavy": (1_800, 30, (640, 360), 300),
}


def make_clips(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (frames, fps, size, gop) in CLIPS.items():
        path = folder / f"{name}.mp4"
        if not path.exists():
            started = time.perf_counter()
            make_video(path, n_frames=frames, fps=fps, size=size, gop=gop)
            print(f"encoded {name} ({frames} frames of {size[0]}x{size[1]}) in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        paths[name] = path
    return paths


def time_decoder(path: Path, backend: str, repeats: int) -> tuple[float, list[int], list[str]]:
    """(median seconds, indices, notes) of load_video with this backend, after one untimed run."""
    from sharp_cli.video import load_video

    clip = load_video(path, frames=32, max_pixels=BUDGET, backend=backend)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load_video(path, frames=32, max_pixels=BUDGET, backend=backend)
        times.append(time.perf_counter() - started)
    return statistics.median(times), list(clip.indices), list(clip.notes)


_COLD = """
import sys, time
import torch  # noqa: F401  (sharp imports torch before decord)
from sharp_cli.video import load_video
started = time.perf_counter()
load_video(sys.argv[1], frames=32, max_pixels={budget}, backend=sys.argv[2])
print(time.perf_counter() - started)
"""


def time_cold(path: Path, backend: str, repeats: int) -> float | None:
    """Median seconds of the first load_video in a fresh process (what one `sharp ask` pays: the
    decoder's libraries load on first use), torch already imported; None (one line on stderr) when a
    run fails."""
    import subprocess

    # The repo first, then whatever PYTHONPATH already held (where the decoders may be installed).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")) if p))
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _COLD.format(budget=BUDGET), str(path), backend],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"first call with {backend} failed in a fresh process: {last}", file=sys.stderr)
            return None
        runs.append(float(done.stdout))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=Path, default=Path("/tmp/sharp-decoder-clips"), help="where the clips go")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    import torch  # noqa: F401  (before decord, as sharp loads them)

    from sharp_cli.video import available_backends

    paths = make_clips(args.clips)
    rows = []
    for name, path in paths.items():
        decord_s, decord_idx, decord_notes = time_decoder(path, "decord", args.repeats)
        pyav_s, pyav_idx, _ = time_decoder(path, "pyav", args.repeats)
        if decord_idx != pyav_idx:
            raise SystemExit(f"{name}: the decoders sampled different frames "
                             f"({decord_idx[:4]}... vs {pyav_idx[:4]}...)")
        frames, fps, (w, h), gop = CLIPS[name]
        cold = {b: time_cold(path, b, args.repeats) for b in ("decord", "pyav")} if name == "readme-128px" else {}
        rows.append({"clip": name, "frames": frames, "fps": fps, "size": f"{w}x{h}", "keyframe_every": gop,
                     "decord_ms": round(decord_s * 1000, 1), "pyav_ms": round(pyav_s * 1000, 1),
                     "faster": "pyav" if pyav_s < decord_s else "decord", "decord_notes": decord_notes,
                     **{f"{b}_first_call_ms": None if t is None else round(t * 1000, 1) for b, t in cold.items()}})
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load": [round(x, 2) for x in os.getloadavg()], "repeats": args.repeats,
              "decoders": available_backends(), "sampled": "32 frames, at most 602,112 pixels each", "rows": rows}
    print("| clip | frames | size | decord | PyAV | faster |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clip']} | {r['frames']:,} at {r['fps']} fps | {r['size']} | {r['decord_ms']:.1f} ms | "
              f"{r['pyav_ms']:.1f} ms | {r['faster']} |")
    for r in rows:
        if "decord_first_call_ms" in r:
            ms = {b: "failed" if r[f"{b}_first_call_ms"] is None else f"{r[f'{b}_first_call_ms']:.1f} ms"
                  for b in ("decord", "pyav")}
            print(f"\nfirst call in a fresh process ({r['clip']}, as one `sharp ask` decodes): decord "
                  f"{ms['decord']}, PyAV {ms['pyav']}")
    print(f"\n{result['cpus']} CPUs, load average {result['load']}, median of {args.repeats}; "
          f"decoders {result['decoders']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Questions per second with continuous batching (`--max-batch`), against stock transformers.

One run, sections in this order, each skipped (and listed under `skipped`) when the --seconds
budget would not hold it:
1. batch: `sharp batch`'s own code path (sharp_cli/batch.py, the model loaded once, bf16) over
   --clips distinct synthetic clips: one at a time (--max-batch 1) and batched; then stock
   transformers `generate()` batched at --stock-batch with left padding, same clips, same tokens.
2. in flight: the most --long-frames sequences decoded at once within --kv-gb, pruned (sharp) and
   unpruned (one long clip asked many questions; the scheduler admits until the budget is full).
3. serve: a `sharp serve --max-batch` process at each --clients concurrency, pruned and
   unpruned: questions per second, median and 95th percentile latency per request.
4. shell: --ask-calls `sharp ask --server` processes against that server, then cold `sharp ask`
   processes (each loads the model) as many as --cold allows; the 20-call figure is their mean x 20.
5. nf4: section 1's batched `sharp batch` again with --quant nf4.

Answers decode --tokens tokens (stock: min_new_tokens; sharp: until EOS or --tokens, which random
weights almost never end early: the table gives the tokens decoded). Video decoding is inside
every figure (sharp batch decodes ahead in threads; stock decodes before each batch).

GPU (Qwen2.5-VL-7B architecture, random weights, no download; about 8 minutes on an H200):
    python -m scripts.throughput_bench --output throughput.json
CPU check of the whole run with sharp-tiny and tiny sizes (minutes):
    python -m scripts.throughput_bench --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from scripts.throughput_sections import left, run_local, serve_and_shell

SMOKE = dict(model="sharp-tiny", random_weights=False, device="cpu", clips=3, width=64, height=64, frames=8,
             tokens=4, max_batch=3, stock_batch=2, clients=[1, 2], serve_batch=2, serve_kv_gb=0.05,
             long_frames=16, kv_gb=0.002, inflight_max=32, ask_calls=2, cold=1, nf4=False, seconds=1500)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.deadline = started + args.seconds
    work = Path(tempfile.mkdtemp(prefix="sharp-throughput-"))
    result = {"settings": {k: v for k, v in vars(args).items() if k != "deadline"}, "skipped": []}
    try:
        clips = write_clips(work, args)
        result["clips"] = {"count": len(clips["timed"]), "size": f"{args.width}x{args.height}", "frames": args.frames}
        if not args.skip_local:
            run_local(args, clips, work, result, quant="none")
        if not args.skip_serve:
            serve_and_shell(args, clips, work, result)
        if args.nf4 and left(args) > 150:
            run_local(args, clips, work, result, quant="nf4")
        elif args.nf4:
            result["skipped"].append("nf4 (budget)")
    finally:
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        text = json.dumps(result, indent=2, default=str)
        if args.output:
            Path(args.output).write_text(text + "\n")
        print(table(result))
    # A section whose questions failed measured nothing: say so in the exit code, not only in the table.
    return 1 if failures(result) else 0


def failures(result: dict) -> int:
    """Failed questions and request errors over every section of the result."""
    rows = [row for key in ("batch", "batch_nf4") for row in result.get(key, {}).values() if isinstance(row, dict)]
    rows += [row for row in result.get("serve", {}).values() if isinstance(row, dict)]
    return sum(row.get("failed", 0) or row.get("errors", 0) or 0 for row in rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--clips", type=int, default=28)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--frames", type=int, default=32, help="frames per clip (8 s at 4 fps)")
    p.add_argument("--tokens", type=int, default=64, help="answer tokens")
    p.add_argument("--max-batch", type=int, default=16, help="sharp batch --max-batch")
    p.add_argument("--stock-batch", type=int, default=8)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    p.add_argument("--serve-batch", type=int, default=32, help="sharp serve --max-batch")
    p.add_argument("--serve-kv-gb", type=float, default=40.0)
    p.add_argument("--long-frames", type=int, default=128)
    p.add_argument("--kv-gb", type=float, default=24.0, help="KV budget of the in-flight section")
    p.add_argument("--inflight-max", type=int, default=256, help="--max-batch of the in-flight section")
    p.add_argument("--ask-calls", type=int, default=20)
    p.add_argument("--cold", type=int, default=3, help="cold `sharp ask` processes at most")
    p.add_argument("--nf4", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--skip-local", action="store_true", help="sections 1-2 left out")
    p.add_argument("--skip-serve", action="store_true", help="sections 3-4 left out (with --skip-local: nf4 only)")
    p.add_argument("--seconds", type=float, default=470)
    p.add_argument("--output", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU check: sharp-tiny, tiny sizes, every section but nf4")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


# -- clips ------------------------------------------------------------------------------------------------
def write_clips(work: Path, args) -> dict:
    """--clips distinct clips, 2 warm-up clips and one --long-frames clip, as mp4 files."""
    from sharp_cli.bench import synthetic_clip

    folder = work / "videos"
    folder.mkdir()
    paths = {"timed": [], "warm": []}
    for i in range(args.clips + 2):
        clip = synthetic_clip(args.frames, args.height, args.width, seed=i)
        path = folder / f"clip-{i:02d}.mp4"
        encode(clip.frames, path, fps=4.0)
        paths["timed" if i < args.clips else "warm"].append(path)
    long = synthetic_clip(args.long_frames, args.height, args.width, seed=999)
    paths["long"] = folder / "long.mp4"
    encode(long.frames, paths["long"], fps=4.0)
    return paths


def encode(frames, path: Path, fps: float) -> None:
    try:
        from sharp_cli.evaluate.synth import write_mp4

        write_mp4(frames, path, fps)
    except ImportError:  # no PyAV (the GPU image): OpenCV
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()


# -- the table --------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    def qps(row):
        if not row:
            return "-"
        failed = f", **{row['failed']} FAILED**" if row.get("failed") else ""
        return f"{row['questions_per_second']:.2f} q/s ({row['questions']} q, {row.get('tokens', 0)} tokens{failed})"

    lines = ["| | measured |", "|---|---|"]
    for key in ("batch", "batch_nf4"):
        section = result.get(key, {})
        label = section.get("dtype")
        for name, row in section.items():
            if name.startswith("max_batch_"):
                lines.append(f"| `sharp batch --max-batch {name[10:]}`, {label} | {qps(row)}, decode batch up to "
                             f"{row['decode_batch_max']} |")
        if "stock_generate" in section:
            lines.append(f"| stock `generate()`, batch {section['stock_generate']['batch']} left-padded, {label} | "
                         f"{qps(section['stock_generate'])} |")
    flight = result.get("in_flight")
    if flight:
        for name in ("sharp", "none"):
            row = flight.get(name, {})
            lines.append(f"| {flight['frames']}-frame sequences in flight at {flight['kv_gb']} GiB KV, {name} | "
                         f"{row.get('most_in_flight')} ({(row.get('slot_bytes') or 0) / 2**20:.1f} MiB a slot) |")
    serve = result.get("serve", {})
    for key, row in serve.items():
        if "@" in key:
            method, clients = key.split("@")
            lines.append(f"| `sharp serve`, {method}, {clients} clients | {qps(row)}, latency median "
                         f"{row['latency_median']} s, p95 {row['latency_p95']} s, decode batch up to "
                         f"{row['decode_batch_max']}, errors {row['errors']} |")
    shell_ = result.get("shell")
    if shell_ and "calls" in shell_:
        lines.append(f"| {shell_['calls']} `sharp ask --server` calls | {shell_['total_seconds']} s, median "
                     f"{shell_['median_seconds']} s a call, {shell_['median_over_answer_seconds']} s over the "
                     "server's answer time |")
    c = (shell_ or {}).get("cold") or {}
    if c.get("ran"):
        lines.append(f"| cold `sharp ask` processes | {c['ran']} ran, {c['mean_seconds']} s each: "
                     f"~{c['estimated_seconds_for_20']} s for 20 |")
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    lines.append(f"wall: {result.get('wall_seconds')} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

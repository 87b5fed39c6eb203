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
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scripts.serve_bench import free_port, stream_request, wait_for_health

QUESTION = "Describe what happens in this video."
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
        result["clips"] = {"count": len(clips), "size": f"{args.width}x{args.height}", "frames": args.frames}
        if not args.skip_local:
            run_local(args, clips, work, result, quant="none")
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
    return 0


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
    p.add_argument("--seconds", type=float, default=470)
    p.add_argument("--output", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU check: sharp-tiny, tiny sizes, every section but nf4")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def left(args) -> float:
    return args.deadline - time.monotonic()


def model_flags(args, quant="none") -> list[str]:
    flags = ["-m", args.model, "--device", args.device, "--quant", quant]
    return flags + (["--random-weights"] if args.random_weights else [])


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


# -- sections 1, 2 and 5: in this process -----------------------------------------------------------------
def run_local(args, clips, work, result, quant: str) -> None:
    import torch

    from sharp_cli import loading

    began = time.monotonic()
    loaded = loading.load(args.model, device=args.device, quant=quant, random_weights=args.random_weights)
    key = "batch" if quant == "none" else f"batch_{quant}"
    out = result.setdefault(key, {"load_seconds": round(time.monotonic() - began, 1),
                                  "dtype": str(loaded.dtype).replace("torch.", "") + ("" if quant == "none" else
                                                                                      f", {quant}")})
    widths = [1, args.max_batch] if quant == "none" else [args.max_batch]
    for width in widths:
        if left(args) < 60:
            result["skipped"].append(f"{key}: --max-batch {width} (budget)")
            continue
        sharp_batch(loaded, clips["warm"], work, width, args)  # warm-up: kernels, graphs of the buckets, priors
        out[f"max_batch_{width}"] = sharp_batch(loaded, clips["timed"], work, width, args)
    if quant == "none":
        if left(args) > 90:
            out["stock_generate"] = stock_generate(loaded, clips, args)
        else:
            result["skipped"].append("stock generate() (budget)")
        if left(args) > 150:
            result["in_flight"] = in_flight(loaded, clips["long"], args)
        else:
            result["skipped"].append("in flight (budget)")
    del loaded
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sharp_batch(loaded, paths, work: Path, width: int, args) -> dict:
    """`sharp batch` after its model load: batch.run over these clips, one question each."""
    from sharp_cli import batch, measure
    from sharp_cli.overrides import Defaults
    from sharp_cli.prune.config import PruneConfig

    cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.15).validate())
    video = dict(frames=args.frames, fps=None, max_frames=768, max_pixels=None, backend="auto")
    defaults = Defaults(cfg, video, args.tokens)
    lines = [json.dumps({"id": p.stem, "video": str(p), "question": QUESTION}) for p in paths]
    out = work / f"batch-{width}-{time.monotonic_ns()}.jsonl"
    measure.synchronize(loaded.device)
    began = time.perf_counter()
    failed = batch.run(loaded, lines, defaults, work, str(out), batch.Progress(True, None), max_batch=width)
    seconds = time.perf_counter() - began
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(r.get("new_tokens", 0) for r in records)
    return {"questions": len(records), "failed": failed, "seconds": round(seconds, 3),
            "questions_per_second": round(len(records) / seconds, 3), "tokens": tokens,
            "decode_batch_max": max((r.get("decode_batch", 1) for r in records), default=None),
            "decode_mode": sorted({r.get("decode_mode") for r in records if r.get("decode_mode")})}


def stock_generate(loaded, clips, args) -> dict:
    """transformers' generate() over the same clips, --stock-batch at a time, left padding."""
    import torch

    from sharp_cli import measure
    from sharp_cli.peers import stock_attention
    from sharp_cli.video import load_video

    processor, adapter = loaded.processor, loaded.adapter
    processor.tokenizer.padding_side = "left"

    def run(paths):
        clips_ = [load_video(p, frames=args.frames) for p in paths]
        prompt = adapter.prompt(processor, QUESTION)
        vp = processor.video_processor
        sized = {"size": adapter.video_size(vp, args.frames, None)} if hasattr(adapter, "video_size") else {}
        if hasattr(type(vp), "cap_pixels_per_frame"):  # as sharp's adapter calls it: the budget is in the bounds
            sized["cap_pixels_per_frame"] = False
        inputs = processor(text=[str(prompt)] * len(clips_), videos=[c.frames for c in clips_], return_tensors="pt",
                           padding=True, do_sample_frames=False, video_metadata=[c.metadata() for c in clips_],
                           **sized).to(loaded.device)
        with stock_attention(loaded), torch.inference_mode():
            out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=args.tokens,
                                        min_new_tokens=args.tokens)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * len(paths)

    run(clips["warm"][: min(2, args.stock_batch)])  # warm-up
    measure.synchronize(loaded.device)
    began, tokens = time.perf_counter(), 0
    timed = clips["timed"]
    for start in range(0, len(timed), args.stock_batch):
        tokens += run(timed[start:start + args.stock_batch])
    measure.synchronize(loaded.device)
    seconds = time.perf_counter() - began
    processor.tokenizer.padding_side = "right"
    return {"questions": len(timed), "batch": args.stock_batch, "seconds": round(seconds, 3),
            "questions_per_second": round(len(timed) / seconds, 3), "tokens": tokens}


def in_flight(loaded, path, args) -> dict:
    """The most sequences of one long clip in flight at once within --kv-gb, pruned and not."""
    import torch

    from sharp_cli.prune import PruneConfig
    from sharp_cli.prune.prior import PriorStore
    from sharp_cli.scheduler import Request, Scheduler
    from sharp_cli.video_cache import VideoCache

    clip = VideoCache(8 * 2**30).load_video(path, frames=args.long_frames)
    out = {"frames": args.long_frames, "kv_gb": args.kv_gb}
    for name, method in (("sharp", "sharp"), ("none", "none")):
        cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=0.15))
        cache = VideoCache(8 * 2**30)  # the vision output and prompt start are reused: admission is quick
        scheduler = Scheduler(loaded, max_batch=args.inflight_max, kv_bytes=int(args.kv_gb * 2**30),
                              store=PriorStore(), cache=cache)
        for i in range(args.inflight_max + 1):
            scheduler.submit(Request(clip, f"Question {i}: {QUESTION}", cfg, max_new_tokens=args.tokens,
                                     ignore_eos=True))
        began, seen = time.monotonic(), 0  # all are queued: one advance admits every one that fits
        while time.monotonic() - began < max(30.0, left(args) / 4):
            scheduler.advance()
            seen = max(seen, scheduler.in_flight)
            if scheduler._queue and scheduler._queue[0].begun is not None and scheduler.slots is not None \
                    and scheduler.in_flight >= scheduler.slots.slots:
                break  # every slot the budget holds is taken, the next request waits
        slots = scheduler.slots
        out[name] = {"most_in_flight": seen, "slots": slots.slots if slots else None,
                     "slot_bytes": slots.cache.bytes_allocated() // slots.slots if slots else None,
                     "fill_seconds": round(time.monotonic() - began, 1)}
        scheduler.cancel_all()
        del scheduler, cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


# -- sections 3 and 4: a server process -------------------------------------------------------------------
def serve_and_shell(args, clips, work, result) -> None:
    if left(args) < 90:
        result["skipped"].append("serve and shell (budget)")
        return
    port = free_port()
    log = open(work / "serve.log", "w")
    command = [sys.executable, "-m", "sharp_cli", "serve", *model_flags(args), "--port", str(port),
               "--media-dir", str(work / "videos"), "--frames", str(args.frames), "--max-new-tokens",
               str(args.tokens), "--max-batch", str(args.serve_batch), "--kv-gb", str(args.serve_kv_gb),
               "--cache-gb", "0", "--max-queue", str(4 * max(args.clients)), "-q"]
    launched = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    serve = result.setdefault("serve", {"command": " ".join(command)})
    try:
        if not wait_for_health(port, proc, args.deadline):
            result["skipped"].append("serve: not healthy in time; log: " + (work / "serve.log").read_text()[-500:])
            return
        serve["startup_seconds"] = round(time.monotonic() - launched, 1)
        names = [p.name for p in clips["timed"]]
        for method in ("sharp", "none"):
            load(port, names[: max(args.clients)] * 2, 8, {"method": method, "max_tokens": 4})  # warm-up
            for clients in args.clients:
                if left(args) < 60:
                    result["skipped"].append(f"serve: {method} at {clients} clients (budget)")
                    continue
                count = max(len(names), 2 * clients)
                serve[f"{method}@{clients}"] = load(port, [names[i % len(names)] for i in range(count)], clients,
                                                    {"method": method, "max_tokens": args.tokens})
        result["shell"] = shell(args, clips, port, result["skipped"])
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    result.setdefault("shell", {})["cold"] = cold(args, clips, result["skipped"])


def load(port: int, videos: list[str], clients: int, fields: dict) -> dict:
    """`clients` threads sending these questions (one video each), as fast as answers come."""
    todo: queue.Queue = queue.Queue()
    for i, name in enumerate(videos):
        todo.put({"key": str(i), "video": name, "question": f"{QUESTION} ({i})"})
    done: list = []

    def client():
        while True:
            try:
                q = todo.get_nowait()
            except queue.Empty:
                return
            done.append(stream_request(port, q, fields["max_tokens"], timeout=600, extra=fields))

    began = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - began
    ok = [r for r in done if not r.get("error")]
    latency = sorted(r["total_seconds"] for r in ok)
    return {"questions": len(done), "errors": len(done) - len(ok), "seconds": round(seconds, 3),
            "questions_per_second": round(len(ok) / seconds, 3),
            "latency_median": round(statistics.median(latency), 3) if latency else None,
            "latency_p95": round(latency[min(len(latency) - 1, int(0.95 * len(latency)))], 3) if latency else None,
            "tokens": sum(r.get("new_tokens") or 0 for r in ok),
            "decode_batch_max": max((r.get("decode_batch") or 1 for r in ok), default=None),
            "first_error": next((r["error"] for r in done if r.get("error")), None)}


def shell(args, clips, port: int, skipped) -> dict:
    """`sharp ask --server` from a shell, one process per question: wall time against the answer's
    own time on the server."""
    runs = []
    for i in range(args.ask_calls):
        if left(args) < 30:
            skipped.append(f"shell: {args.ask_calls - i} `sharp ask --server` calls (budget)")
            break
        path = clips["timed"][i % len(clips["timed"])]
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", str(path), f"{QUESTION} ({i})", "--server",
                               f"http://127.0.0.1:{port}", "--max-new-tokens", str(args.tokens), "--json", "-q"],
                              capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - began
        record = json.loads(done.stdout) if done.returncode == 0 else {}
        runs.append({"seconds": round(wall, 3), "answer_seconds": record.get("answer_seconds"),
                     "exit_code": done.returncode, "error": done.stderr.strip()[-200:] or None})
    ok = [r for r in runs if r["exit_code"] == 0]
    over = [r["seconds"] - r["answer_seconds"] for r in ok if r["answer_seconds"] is not None]
    return {"calls": len(runs), "ok": len(ok), "total_seconds": round(sum(r["seconds"] for r in runs), 3),
            "median_seconds": round(statistics.median([r["seconds"] for r in ok]), 3) if ok else None,
            "median_over_answer_seconds": round(statistics.median(over), 3) if over else None, "runs": runs}


def cold(args, clips, skipped) -> dict:
    runs = []
    for i in range(args.cold):
        typical = max((r["seconds"] for r in runs), default=30.0)
        if left(args) < 1.3 * typical:
            skipped.append(f"cold: {args.cold - i} `sharp ask` processes (budget)")
            break
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "sharp_cli", "ask", str(clips["timed"][i]), QUESTION,
                               *model_flags(args), "--frames", str(args.frames), "--max-new-tokens", str(args.tokens),
                               "--json", "-q"], capture_output=True, text=True, timeout=max(60, left(args)))
        runs.append({"seconds": round(time.monotonic() - began, 3), "exit_code": done.returncode,
                     "error": done.stderr.strip()[-200:] if done.returncode else None})
    mean = statistics.mean(r["seconds"] for r in runs) if runs else None
    return {"ran": len(runs), "mean_seconds": round(mean, 3) if mean else None,
            "estimated_seconds_for_20": round(20 * mean, 1) if mean else None, "runs": runs}


# -- the table --------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    def qps(row):
        return f"{row['questions_per_second']:.2f} q/s ({row['questions']} q, {row.get('tokens', 0)} tokens)" \
            if row else "-"

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

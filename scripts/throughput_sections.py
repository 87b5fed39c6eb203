"""The measured sections of scripts.throughput_bench (its docstring says what each measures): 1, 2
and 5 in this process (run_local), 3 and 4 against a `sharp serve` process (serve_and_shell). Each
writes its figures into the run's result, or lists under `skipped` what the --seconds budget would
not hold."""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from scripts.serve_bench import free_port, stream_request, wait_for_health

QUESTION = "Describe what happens in this video."


def left(args) -> float:
    return args.deadline - time.monotonic()


def model_flags(args, quant="none") -> list[str]:
    flags = ["-m", args.model, "--device", args.device, "--quant", quant]
    return flags + (["--random-weights"] if args.random_weights else [])


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

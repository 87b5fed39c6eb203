"""One `sharp serve` versus separate `sharp ask` processes, on the same 20 questions.

Writes 5 short synthetic videos (sharp synth), starts `sharp serve` on a free port, waits for
/health, and asks 4 questions about each video one after another, streamed (time to first token of
each request, from the first content chunk). Then 8 clients at once, each with its own question,
checking every one got the answer the sequential pass gave for that question. Then the server stops
and N separate `sharp ask` processes answer the same questions (each loads the model itself).
Everything must fit in --seconds: what does not fit is skipped and the JSON says so.

GPU (the default model, random weights: no download):
    python -m scripts.serve_bench --processes 8 --seconds 540 --output serve_bench.json
CPU check with a tiny model folder:
    python -m scripts.serve_bench --model DIR --device cpu --quant none --no-random-weights \
        --size 64 --frames 8 --max-tokens 4 --processes 2 --seconds 300
Only the standard library and sharp itself are needed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXTRA_QUESTIONS = ("What happens in this video?", "Describe the background in one sentence.",
                   "How many objects move, and where do they go?")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.seconds
    work = Path(tempfile.mkdtemp(prefix="sharp-serve-bench-"))
    env = dict(os.environ, SHARP_CACHE_DIR=str(work / "cache"))  # both ways start without cached priors
    questions = make_questions(work, args)
    result = {"settings": vars(args) | {"model_args": model_args(args)}, "questions": len(questions),
              "skipped": []}
    try:
        result["server"] = bench_server(args, work, questions, deadline, env, result["skipped"])
        result["processes"] = bench_processes(args, work, questions, deadline, env, result["skipped"],
                                              result["server"].get("answers", {}))
    finally:
        result["wall_seconds"] = round(time.monotonic() - started, 3)
        text = json.dumps(result, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        summarize(result)
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quant", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--processes", type=int, default=20, help="separate `sharp ask` processes (N)")
    p.add_argument("--seconds", type=float, default=540, help="time budget for everything")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=448, help="synthetic video side, pixels (even, >= 64)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the concurrency test")
    p.add_argument("--output", default="serve_bench.json")
    return p.parse_args(argv)


def model_args(args) -> list[str]:
    out = ["-m", args.model, "--quant", args.quant, "--device", args.device]
    return out + (["--random-weights"] if args.random_weights else [])


def make_questions(work: Path, args) -> list[dict]:
    """5 synthetic clips, 4 questions each: the clip's own multiple-choice question, then 3 more."""
    from sharp_cli.evaluate import synth

    try:
        items_file = synth.write(work / "videos", 5, seed=0, frames=max(args.frames, 8), size=args.size)
    except ImportError:  # no PyAV (the GPU image): write the same clips with OpenCV instead
        items_file = write_with_opencv(work / "videos", 5, max(args.frames, 8), args.size)
    questions = []
    for line in items_file.read_text().splitlines():
        item = json.loads(line)
        own = item["question"] + " Options: " + "; ".join(item["options"])
        for n, text in enumerate((own, *EXTRA_QUESTIONS)):
            questions.append({"key": f"{item['id']}/{n}", "video": item["video"], "question": text})
    return questions


def write_with_opencv(out: Path, n: int, frames: int, size: int) -> Path:
    import cv2

    from sharp_cli.evaluate import synth

    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        clip, item = synth.make_item(0, i, frames=frames, size=size)
        path = out / "videos" / f"{item['id']}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (size, size))
        for frame in clip:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        lines.append(json.dumps({**item, "video": f"videos/{item['id']}.mp4"}))
    (out / "items.jsonl").write_text("\n".join(lines) + "\n")
    return out / "items.jsonl"


# -- the server --------------------------------------------------------------------------------------
def bench_server(args, work, questions, deadline, env, skipped) -> dict:
    port = free_port()
    log = open(work / "serve.log", "w")
    command = [sys.executable, "-m", "sharp_cli", "serve", *model_args(args), "--port", str(port),
               "--media-dir", str(work / "videos"), "--frames", str(args.frames),
               "--max-new-tokens", str(args.max_tokens), "--max-queue", str(max(32, args.clients))]
    launched = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    out = {"command": " ".join(command), "log": str(work / "serve.log")}
    try:
        if not wait_for_health(port, proc, deadline):
            skipped.append("server: not healthy before the deadline (or it exited); see its log")
            out["log_tail"] = (work / "serve.log").read_text()[-2000:]
            return out
        out["startup_seconds"] = round(time.monotonic() - launched, 3)
        requests, answers = [], {}
        began = time.monotonic()
        for q in questions:
            if time.monotonic() > deadline - 30:
                skipped.append(f"server: {len(questions) - len(requests)} sequential requests (budget)")
                break
            r = stream_request(port, q, args.max_tokens, timeout=deadline - time.monotonic())
            requests.append(r)
            answers[q["key"]] = r
        out["requests_seconds"] = round(time.monotonic() - began, 3)
        out["total_seconds"] = round(out["startup_seconds"] + out["requests_seconds"], 3)
        out["requests"] = requests
        ttfts = sorted(r["ttft_seconds"] for r in requests if r.get("ttft_seconds") is not None)
        out["ttft_median_seconds"] = ttfts[len(ttfts) // 2] if ttfts else None
        # The first question about a video decodes it and runs the vision encoder; the next three
        # reuse the per-video cache (frames, vision output, the prompt's start).
        first = sorted(r["ttft_seconds"] for r in requests if r["key"].endswith("/0") and r.get("ttft_seconds"))
        again = sorted(r["ttft_seconds"] for r in requests if not r["key"].endswith("/0") and r.get("ttft_seconds"))
        if first and again:
            out["ttft_first_question_median_seconds"] = first[len(first) // 2]
            out["ttft_repeat_question_median_seconds"] = again[len(again) // 2]
            out["ttft_repeat_over_first"] = round(again[len(again) // 2] / first[len(first) // 2], 3)
        out["answers"] = {k: v.get("answer") for k, v in answers.items()}
        per_request = sum(r["total_seconds"] for r in requests) / max(len(requests), 1)
        if time.monotonic() + 10 + 1.5 * args.clients * per_request < deadline:
            out["concurrent"] = concurrent_test(port, questions, answers, args)
        else:
            skipped.append("concurrency test (budget)")
        return out
    finally:
        proc.send_signal(2)  # SIGINT: a graceful stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out["exit_code"] = proc.returncode
        log.close()
        if proc.returncode:  # a stop by SIGINT should be clean: keep what the server said
            out["log_tail"] = Path(log.name).read_text(errors="replace")[-3000:]


def concurrent_test(port, questions, answers, args) -> dict:
    """`clients` requests at once, each a different (video, question), then each again alone: the
    two answers must match. The reference is asked after the concurrent round, in the same cache
    state: a question first answered cold (no cached frames, vision output or prefix) may differ
    from a cached answer by bf16 rounding, which on random weights flips near ties."""
    picked = [questions[(i * 5 + i // 4) % len(questions)] for i in range(args.clients)]
    picked = [q for q in picked if q["key"] in answers] or questions[: args.clients]
    results = [None] * len(picked)

    def client(i):
        results[i] = stream_request(port, picked[i], args.max_tokens, timeout=300)

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(picked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - began
    alone = [stream_request(port, q, args.max_tokens, timeout=300) for q in picked]
    mismatches = []
    for q, r, a in zip(picked, results, alone):
        same = r.get("answer") == a.get("answer") and r.get("video") == a.get("video") \
            and r.get("sequence_tokens") == a.get("sequence_tokens")
        if not same or r.get("error") or a.get("error"):
            mismatches.append({"key": q["key"], "got": r.get("answer"), "alone": a.get("answer"),
                               "error": r.get("error") or a.get("error")})
    return {"clients": len(picked), "seconds": round(seconds, 3),
            "every_request_got_its_own_answer": not mismatches, "mismatches": mismatches,
            "ttft_seconds": [r.get("ttft_seconds") for r in results]}


def stream_request(port, q, max_tokens, timeout, extra: dict | None = None) -> dict:
    """One streamed chat completion: time to first content chunk, total time, the answer. extra:
    more request fields (method, ratio, ...)."""
    payload = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": q["video"]}}, {"type": "text", "text": q["question"]}]}],
        "max_tokens": max_tokens, "stream": True, **(extra or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(timeout, 5))
    sent = time.monotonic()
    first, pieces, record, error = None, [], {}, None
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"key": q["key"], "error": f"HTTP {response.status}: {response.read()[:300]!r}"}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.monotonic()
                    pieces.append(piece)
            record = event.get("sharp", record)
    except (OSError, http.client.HTTPException) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    done = time.monotonic()
    return {"key": q["key"], "video": record.get("video"), "answer": "".join(pieces) if not error else None,
            "ttft_seconds": round(first - sent, 4) if first else None, "total_seconds": round(done - sent, 4),
            "sequence_tokens": record.get("sequence_tokens"), "new_tokens": record.get("new_tokens"),
            "prefill_seconds": record.get("prefill_seconds"), "vision_seconds": record.get("vision_seconds"),
            "decode_batch": record.get("decode_batch"), "error": error}


def wait_for_health(port, proc, deadline) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return True
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- separate processes ------------------------------------------------------------------------------
def bench_processes(args, work, questions, deadline, env, skipped, server_answers) -> dict:
    runs, began = [], time.monotonic()
    for i in range(args.processes):
        q = questions[i % len(questions)]
        left = deadline - time.monotonic()
        typical = max((r["seconds"] for r in runs), default=0.0)
        if left < max(typical * 1.2, 20):
            skipped.append(f"processes: {args.processes - i} of {args.processes} `sharp ask` runs (budget)")
            break
        command = [sys.executable, "-m", "sharp_cli", "ask", str(work / "videos" / q["video"]), q["question"],
                   *model_args(args), "--frames", str(args.frames), "--max-new-tokens", str(args.max_tokens),
                   "--json", "-q"]
        t0 = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=left)
        except subprocess.TimeoutExpired:
            skipped.append(f"processes: run {i + 1} passed the deadline and was stopped")
            break
        record = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}
        runs.append({"key": q["key"], "seconds": round(time.monotonic() - t0, 3), "exit_code": done.returncode,
                     "answer": record.get("answer"), "prefill_seconds": record.get("prefill_seconds"),
                     "vision_seconds": record.get("vision_seconds"),
                     "same_answer_as_server": record.get("answer") == server_answers.get(q["key"])
                     if q["key"] in server_answers else None,
                     "error": done.stderr.strip()[-300:] if done.returncode else None})
    measured = round(time.monotonic() - began, 3)
    mean = measured / len(runs) if runs else None
    return {"ran": len(runs), "of": args.processes, "total_seconds": measured,
            "mean_seconds": round(mean, 3) if mean else None,
            "estimated_total_seconds_for_all": round(mean * args.processes, 3) if mean else None, "runs": runs}


def summarize(result) -> None:
    server, procs = result.get("server", {}), result.get("processes", {})
    lines = [f"server: startup {server.get('startup_seconds')} s, {len(server.get('requests', []))} requests in "
             f"{server.get('requests_seconds')} s, median TTFT {server.get('ttft_median_seconds')} s "
             f"(first question about a video {server.get('ttft_first_question_median_seconds')} s, "
             f"later ones {server.get('ttft_repeat_question_median_seconds')} s: "
             f"{server.get('ttft_repeat_over_first')} of it)"]
    if "concurrent" in server:
        c = server["concurrent"]
        lines.append(f"concurrent: {c['clients']} clients in {c['seconds']} s, own answers: "
                     f"{c['every_request_got_its_own_answer']}")
    if procs:
        lines.append(f"processes: {procs['ran']} of {procs['of']} in {procs['total_seconds']} s "
                     f"(mean {procs['mean_seconds']} s, "
                     f"all {procs['of']}: ~{procs['estimated_total_seconds_for_all']} s)")
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    sys.stderr.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

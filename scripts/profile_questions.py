"""Where a served question's time goes: serve_bench's 20 questions (4 about each of 5 clips)
answered in one process the way `sharp serve` answers them (answer.ask with a VideoCache), each
under cProfile. Prints each question's wall time and phases, and for the slow ones the functions
that took it (device time shows up at the call that waits for the GPU).

    python scripts/profile_questions.py [--frames 32] [--size 448] [--max-tokens 32] [--slow 0.6]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import make_questions  # noqa: E402

from sharp_cli import answer, loading, measure  # noqa: E402
from sharp_cli.prune import PruneConfig  # noqa: E402
from sharp_cli.video_cache import VideoCache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slow", type=float, default=0.6, help="seconds above which a question's profile is printed")
    ap.add_argument("--method", default="sharp")
    args = ap.parse_args()
    started = time.perf_counter()
    loaded = loading.load(args.model, device="auto", quant=args.quant, random_weights=args.model != "sharp-tiny")
    print(f"load {time.perf_counter() - started:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="sharp-profile-"))
    questions = make_questions(work, args)
    cache = VideoCache(8 * 2**30)
    cfg = PruneConfig(method=args.method)
    total = 0.0
    for q in questions:
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        clip = cache.load_video(str(work / "videos" / q["video"]), frames=args.frames)
        result = answer.ask(loaded, clip, q["question"], cfg, max_new_tokens=args.max_tokens, cache=cache)
        measure.synchronize(loaded.device)
        profile.disable()
        wall = time.perf_counter() - t0
        total += wall
        d = result.decoded
        graphs = loaded.graphs
        print(f"{q['key']:18s} wall {wall:6.3f} s: vision {result.vision_seconds:.3f}, prefill "
              f"{result.prefill.seconds:.3f}, decode {d.seconds:.3f} ({d.mode}, capture {d.capture_seconds:.3f}), "
              f"{len(d.tokens)} tokens, seq {result.encoded.layout.seq_len}, tail graphs "
              f"{len(graphs) if graphs is not None else '-'}, cache {result.extra.get('cache')}")
        if wall > args.slow:
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
            stats.print_stats(12)
            print("\n".join("    " + line for line in out.getvalue().splitlines()[6:] if line.strip()))
    print(f"{len(questions)} questions: {total:.2f} s")


if __name__ == "__main__":
    main()

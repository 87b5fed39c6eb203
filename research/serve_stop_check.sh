#!/usr/bin/env bash
# Start `sharp serve`, ask one question (or none), stop it with SIGINT; print its exit code and log.
# Usage: bash research/serve_stop_check.sh OUT_DIR [ask|idle] [extra serve args...]
out=${1:?output folder}; mode=${2:-ask}; shift 2
work=$(mktemp -d); port=$((40000 + RANDOM % 20000))
python3 - "$work" <<'PY'
import sys, numpy as np, cv2
w = cv2.VideoWriter(sys.argv[1] + "/clip.mp4", cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (224, 224))
for i in range(16):
    w.write(np.full((224, 224, 3), i * 15, np.uint8))
w.release()
PY
# Run through a wrapper that says how Python left: a SystemExit's code and where it was raised.
SHARP_DEBUG=1 python3 -X faulthandler - serve --random-weights --quant none --port "$port" --media-dir "$work" \
  --frames 8 --max-new-tokens 8 "$@" > "$work/log" 2>&1 <<'PY' &
import runpy, sys, threading, traceback
sys.argv[0] = "sharp"
threading.excepthook = lambda a: print("exception in thread", a.thread, a.exc_type, a.exc_value, file=sys.stderr)
try:
    runpy.run_module("sharp_cli", run_name="__main__")
except SystemExit as exc:
    print(f"SystemExit({exc.code!r}) raised at:", file=sys.stderr)
    traceback.print_exc()
    raise
except BaseException:
    traceback.print_exc()
    raise
PY
pid=$!
for _ in $(seq 120); do curl -s "localhost:$port/health" > /dev/null && break; sleep 1; done
if [ "$mode" = ask ]; then
  curl -s "localhost:$port/v1/chat/completions" -H 'content-type: application/json' -d \
    '{"messages":[{"role":"user","content":[{"type":"video_url","video_url":{"url":"clip.mp4"}},{"type":"text","text":"what?"}]}]}' | head -c 300; echo
fi
kill -INT "$pid"; wait "$pid"; rc=$?
echo "serve ($mode) exit code after SIGINT: $rc" | tee -a "$out/serve-stop.txt"
cat "$work/log" >> "$out/serve-stop.txt"

#!/usr/bin/env bash
# sharp-small's acceptance checks on the lent GPU, right after a training call on the same warm machine
# (the trained folders stay in /tmp/NAME there), so a choice between checkpoints needs no CPU hours here
# (`sharp diagnose` of 200 items takes ~16 minutes on this 2-core CPU).
# The set is written on the machine: `sharp synth` of a seed gives the same items.jsonl anywhere (checked
# against the sha256 below; the dev set of docs/eval.md, seed 999) and needs PyAV, so carry .whl-all.
# float32 on the GPU, as the CPU runs of docs/eval.md (TF32 off: torch's default for matmul).
# SEED=0 runs the held-out set of seed 0 instead (for the one checkpoint the dev set chose). N=600 (dev
# set only) narrows the intervals for a choice between checkpoints: synth's items are made one by one
# from the seed, so the first 200 of 600 are the 200-item set (checked); the checks are reported on 200.
# Usage (device machine, repo root): [SEED=0] [N=600] bash research/gpu_diagnose_small.sh OUT MODEL_FOLDER...
out=${1:?}; shift
[ -n "${SHARP_SETUP_DONE:-}" ] || source research/gpu_setup.sh
set -o pipefail
seed=${SEED:-999}
n=${N:-200}
dev=/tmp/set-s$seed-n$n
case $seed in
  999) want=0dcac0e90053c60cb71a32f58792bb8e340b27887bfb52f08a2de3c37e2e2c2e ;;  # /work/runs/dev-s999
  0) want=6e298d27ea396b29ddd5b70a8e69391aaf3f2f1d0f02b04e8c4cbd66776fa0f0 ;;  # /work/runs/heldout-s0
  *) want=unknown ;;
esac
if [ ! -f $dev/items.jsonl ]; then
  python3 -m sharp_cli synth $dev --n $n --seed $seed --tasks all --frames 64 --size 168 -q
fi
got=$(head -200 $dev/items.jsonl | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || echo "WARNING: $dev/items.jsonl is not seed $seed's set of docs/eval.md ($got)"
# The models side by side: each is a 17M-parameter model answering one item at a time, far from
# filling the GPU, so two at once take about the time of one.
start=$(date +%s)
for model in "$@"; do
  name=$(basename "$model")
  python3 -m sharp_cli diagnose $dev/items.jsonl -m "$model" --device cuda --dtype float32 --quant none \
    --n $n --frames 64 --json > "$out/diag-s$seed-n$n-$name.json" 2> "$out/diag-s$seed-n$n-$name.err" &
done
wait
echo "diagnosed $# models side by side in $(( $(date +%s) - start )) s"
for model in "$@"; do
  name=$(basename "$model")
  echo "$name:"
  [ -s "$out/diag-s$seed-n$n-$name.json" ] || { echo "  failed:"; tail -3 "$out/diag-s$seed-n$n-$name.err"; continue; }
  python3 - "$out/diag-s$seed-n$n-$name.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(" ", d["pruning"]["accuracy"])
for c in d["checks"]:
    print("  ", "PASS" if c["passed"] else "FAIL", c["check"], c["value"], c.get("interval", ""))
EOF
done

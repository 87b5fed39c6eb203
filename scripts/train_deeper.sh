#!/usr/bin/env bash
# Two sharp-tiny recipes with a deeper decoder (8 layers: at K=2 pruning keeps 6 of 8 layers on the kept
# tokens, where the shipped 4-layer model keeps 2), trained side by side on one GPU in one device call:
# a 16-frame stage, then a 32-frame stage continuing it (the shipped model's curriculum).
# Usage (device, repo root): source scripts/gpu_setup.sh; bash scripts/train_deeper.sh OUT [STAGE1_MIN] [STAGE2_MIN]
out=${1:?output folder}; m1=${2:-4.2}; m2=${3:-3.9}
train() {  # train NAME SIZE-AND-BATCH...
  local name=$1; shift
  python3 scripts/train_sharp_tiny.py --device cuda --frames 16 --lr 1e-2 --minutes "$m1" --workers 7 \
    --log-every 200 --eval-every 1000 --final-items 200 --out "$out/$name-stage1" "$@" > "$out/$name-stage1.log" 2>&1 &&
  python3 scripts/train_sharp_tiny.py --device cuda --frames 32 --lr 3e-3 --minutes "$m2" --workers 7 \
    --log-every 200 --eval-every 1000 --final-items 400 --init-from "$out/$name-stage1" --out "$out/$name" "$@" \
    > "$out/$name-stage2.log" 2>&1
  echo "$name: exit $?"
}
train l8-h96-b8 --layers 8 --hidden 96 --vision-depth 2 --vision-hidden 64 --batch 8 &
train l8-h128-b16 --layers 8 --hidden 128 --vision-depth 2 --vision-hidden 64 --batch 16 &
wait
for f in "$out"/*.log; do echo "== $f"; grep -E "held_out|saved|step .*(acc|check)" "$f" | tail -4; done

#!/usr/bin/env bash
# Two sharp-tiny recipes with a deeper decoder (8 layers: at K=2 pruning keeps 6 of 8 layers on the kept
# tokens, where the shipped 4-layer model keeps 2), trained side by side on one GPU in one device call,
# 7 data workers each, through research/train_one.sh (a 16-frame stage, then a 32-frame stage continuing it).
# Usage (device, repo root): source research/gpu_setup.sh; bash research/train_deeper.sh OUT [STAGE1_MIN] [STAGE2_MIN]
out=${1:?output folder}; m1=${2:-4.2}; m2=${3:-3.9}
size=(--vision-depth 2 --vision-hidden 64 --layers 8)
WORKERS=7 bash research/train_one.sh "$out" l8-h96-b8 "$m1" "$m2" "${size[@]}" --hidden 96 --batch 8 &
WORKERS=7 bash research/train_one.sh "$out" l8-h128-b16 "$m1" "$m2" "${size[@]}" --hidden 128 --batch 16 &
wait

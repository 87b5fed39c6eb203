#!/usr/bin/env bash
# One sharp-tiny recipe on the GPU, 16 frames then 32 frames continuing it; the model folder comes back as one
# tarball (a device call returns at most 8 files). WORKERS (default 14) data processes.
# Usage: bash research/train_one.sh OUT NAME MIN1 MIN2 SIZE-ARGS...
out=${1:?}; name=${2:?}; m1=${3:?}; m2=${4:?}; shift 4; workers=${WORKERS:-14}
python3 -c "import transformers; print('transformers', transformers.__version__)" | tee "$out/$name-version.txt"
python3 -m scripts.train_sharp_tiny --device cuda --frames 16 --lr 1e-2 --minutes "$m1" --workers "$workers" --log-every 200 \
  --eval-every 1000 --final-items 200 --out /tmp/$name-stage1 "$@" > "$out/$name-stage1.log" 2>&1 &&
python3 -m scripts.train_sharp_tiny --device cuda --frames 32 --lr 3e-3 --minutes "$m2" --workers "$workers" --log-every 200 \
  --eval-every 1000 --final-items 400 --init-from /tmp/$name-stage1 --out /tmp/$name "$@" > "$out/$name-stage2.log" 2>&1
echo "$name: exit $?"; tar -C /tmp -czf "$out/$name.tgz" "$name" "$name-stage1"
grep -h held_out "$out/$name"-stage*.log

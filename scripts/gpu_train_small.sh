#!/usr/bin/env bash
# sharp-small on the lent GPU: stages of scripts/train_sharp_small.py, each continuing the last; the
# final model comes back as <= 15 MB parts of one tarball (a device call returns at most 8 files of
# 16 MiB). A checkpoint carried in ckpt/init (the parts of an earlier call, unpacked) is continued.
# Usage (device machine, repo root; carry .whl-tf and, to continue, ckpt):
#   bash scripts/gpu_train_small.sh OUT NAME "MINUTES ARGS..." ["MINUTES ARGS..." ...]
# e.g. bash scripts/gpu_train_small.sh $OUT s1 "3.5 --language 1.0" "4.5 --language 0.3"
out=${1:?}; name=${2:?}; shift 2
source scripts/gpu_setup.sh
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$out/$name-version.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee -a "$out/$name-version.txt"
init=""
[ -f ckpt/init/training.json ] && init=ckpt/init
stage=0
for spec in "$@"; do
  stage=$((stage + 1)); read -r minutes args <<< "$spec"
  python3 -m scripts.train_sharp_small --device cuda --minutes "$minutes" --workers 14 --out "/tmp/$name" \
    ${init:+--init-from "$init"} $args > "$out/$name-stage$stage.log" 2>&1
  echo "stage $stage ($spec): exit $?"
  grep -v '^{' "$out/$name-stage$stage.log" | tail -4
  grep '^{' "$out/$name-stage$stage.log" | tail -1 | cut -c1-1500
  [ -f "/tmp/$name/training.json" ] || break
  rm -rf "/tmp/$name-prev" && cp -r "/tmp/$name" "/tmp/$name-prev" && init="/tmp/$name-prev"
done
tar -C /tmp -czf - "$name" | split -b 15m - "$out/$name.tgz.part-"
ls -la "$out"

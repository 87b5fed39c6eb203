#!/usr/bin/env bash
# sharp-small on the lent GPU: stages of `python -m scripts.train_sharp_small`, each continuing the last; the
# final model comes back as <= 15 MiB parts of one tarball (a device call returns at most 8 files of
# 16 MiB, 64 MiB in all). Continues ckpt/init (an earlier call's parts, unpacked; carry `ckpt`) unless
# INIT=none (from scratch) or INIT=<folder>. WORKERS data processes (default 14: two runs side by
# side take 7 each); RETURN=0 keeps the model on the machine (logs only).
# Usage (device machine, repo root; carry .whl-tf):
#   bash research/gpu_train_small.sh OUT NAME "MINUTES ARGS..." ["MINUTES ARGS..." ...]
# e.g. bash research/gpu_train_small.sh $OUT s1 "3.5 --language 1.0" "4.5 --language 0.3"
# A stage "lm MINUTES ARGS..." pretrains the language model alone (scripts.pretrain_small_lm).
out=${1:?}; name=${2:?}; shift 2
# Sourced once per call: runs side by side (`... & ... & wait`) after one `source research/gpu_setup.sh` skip it,
# so neither reinstalls the wheels under the other.
[ -n "${SHARP_SETUP_DONE:-}" ] || source research/gpu_setup.sh
init=${INIT:-}
[ -z "$init" ] && [ -f ckpt/init/training.json ] && init=ckpt/init
[ "$init" = none ] && init=""
log="$out/$name.log"
{ python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; } > "$log" 2>&1
stage=0
for spec in "$@"; do
  stage=$((stage + 1)); read -r minutes args <<< "$spec"
  echo "== stage $stage: $spec (from ${init:-scratch})" >> "$log"
  if [ "$minutes" = lm ]; then  # "lm MINUTES ARGS": the language model alone (scripts.pretrain_small_lm)
    read -r minutes args <<< "$args"
    python3 -m scripts.pretrain_small_lm --device cuda --minutes "$minutes" --out "/tmp/$name" \
      ${init:+--init-from "$init"} $args >> "$log" 2>&1
  else
    python3 -m scripts.train_sharp_small --device cuda --minutes "$minutes" --workers "${WORKERS:-14}" \
      --out "/tmp/$name" ${init:+--init-from "$init"} $args >> "$log" 2>&1
  fi
  echo "$name stage $stage ($spec): exit $?"
  grep -v '^{' "$log" | grep '^step' | tail -2
  grep '^{' "$log" | tail -1 | cut -c1-1200
  [ -f "/tmp/$name/training.json" ] || break
  rm -rf "/tmp/$name-prev" && cp -r "/tmp/$name" "/tmp/$name-prev" && init="/tmp/$name-prev"
done
[ "${RETURN:-1}" = 1 ] && tar -C /tmp -czf - "$name" | split -b 15m - "$out/$name.tgz.part-"
ls -la "$out"

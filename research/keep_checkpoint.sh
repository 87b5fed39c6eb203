#!/usr/bin/env bash
# Keep a sharp-small checkpoint a device call returned, so the next session can continue it: unpack
# FILES_AT/NAME.tgz.part-* into research/checkpoints/NAME, check that it is a whole model (config,
# weights, training.json; the weights load), and stage it. Commit it with the call's results; the
# next call carries it as ckpt/NAME (`cp -r research/checkpoints/NAME ckpt/`, after
# `bash research/carry.sh off`). Why: the r1-p5 line was lost with a session's machine
# (research/rebuild_small.md, "Keeping the checkpoints").
#   bash research/keep_checkpoint.sh FILES_AT NAME
set -euo pipefail
from=${1:?the folder a call returned its files to}; name=${2:?checkpoint name}
cd "$(git rev-parse --show-toplevel)"
ls "$from/$name".tgz.part-* > /dev/null
dest=research/checkpoints
mkdir -p "$dest"
rm -rf "${dest:?}/$name"
cat "$from/$name".tgz.part-* | tar -xzf - -C "$dest"
for f in config.json model.safetensors training.json; do
  [ -s "$dest/$name/$f" ] || { echo "keep_checkpoint: $dest/$name/$f is missing" >&2; exit 1; }
done
"${PYTHON:-.venv/bin/python}" - "$dest/$name" <<'PY'
import json, sys
from safetensors import safe_open
folder = sys.argv[1]
with safe_open(f"{folder}/model.safetensors", "pt") as f:
    count = len(list(f.keys()))
record = json.load(open(f"{folder}/training.json"))
print(f"{folder}: {count} tensors, steps {record.get('steps')}, items {record.get('items_from')}..{record.get('items_to')},"
      f" init {record.get('init_from')}, {record.get('gpu')}")
PY
git add "$dest/$name"

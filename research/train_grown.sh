#!/usr/bin/env bash
# The shipped sharp-tiny continued on the GPU two ways side by side, same recipe and items: as it is
# (4 layers), and grown to 8 layers (research/grow_sharp_tiny.py: zeroed blocks, the same function at
# the start; the retrieval loss stays on the source's last layer, 6). docs/eval.md, "sharp-tiny".
# Usage (device machine, repo root, transformers >= 5.18): bash research/train_grown.sh OUT [MINUTES]
out=${1:?}; minutes=${2:-8.3}; src=sharp_cli/models/sharp_tiny
python3 -c "import transformers; print('transformers', transformers.__version__)" | tee "$out/grown-version.txt"
python3 -m research.grow_sharp_tiny "$src" /tmp/grown8-init --every 1 > "$out/grow.log" 2>&1 || exit 1
run() {  # run NAME INIT EXTRA...
  local name=$1 init=$2; shift 2
  python3 -m scripts.train_sharp_tiny --device cuda --init-from "$init" --frames 32 --batch 8 --lr 3e-3 \
    --minutes "$minutes" --workers 7 --log-every 200 --eval-every 2000 --final-items 400 --out "/tmp/$name" "$@" \
    > "$out/$name.log" 2>&1
  echo "$name: exit $?"
}
run continued4 "$src" & run grown8 /tmp/grown8-init --retrieval-layers 6 & wait
tar -C /tmp -czf "$out/grown.tgz" continued4 grown8
grep -H held_out "$out"/continued4.log "$out"/grown8.log

#!/usr/bin/env bash
# The accuracy tables of docs/eval.md for one model and one pruning layer K: held-out seed 0 (400
# items), none/sharp/fastv/random at four ratios, then sharp with each component off. Every run
# resumes from its results file if a call ends first.
# Usage: bash scripts/eval_tables.sh MODEL K OUT [TABLES]
# TABLES (comma list; default main,no-segment-mask,no-debias,no-dedup,debias-subtract): those, and
# no-debias-no-dedup, segments-4, segments-8, segments-32 (video frames per segment).
model=${1:?}; layer=${2:?}; out=${3:?}; only=${4:-main,no-segment-mask,no-debias,no-dedup,debias-subtract}
mkdir -p "$out"; [ -f /tmp/heldout/items.jsonl ] || sharp synth /tmp/heldout --n 400 --seed 0 -q
E=(sharp eval /tmp/heldout/items.jsonl -m "$model" --quant none --dtype float32 --layer "$layer"
   --ratio 0.5,0.25,0.15,0.10 -q --json)
table() {  # table NAME OPTIONS...
  local name=$1; shift
  case ",$only," in *",$name,"*) ;; *) return ;; esac
  "${E[@]}" "$@" -o "$out/k$layer-$name.jsonl" > "$out/k$layer-$name.json"
}
table main --methods none,sharp,fastv,random
table no-segment-mask --methods none,sharp --no-segment-mask
table no-debias --methods none,sharp --debias none
table no-dedup --methods none,sharp --no-dedup
table debias-subtract --methods none,sharp --debias subtract
table no-debias-no-dedup --methods none,sharp --debias none --no-dedup
for frames in 4 8 32; do table segments-$frames --methods none,sharp --segment-frames $frames; done

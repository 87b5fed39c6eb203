#!/usr/bin/env bash
# The accuracy tables of docs/eval.md for one model and one pruning layer K: held-out seed 0 (400
# items), none/sharp/fastv/random at four ratios, then sharp with each component off. Every run
# resumes from its results file if a call ends first.
# Usage: bash scripts/eval_tables.sh MODEL K OUT [main,no-segment-mask,no-debias,no-dedup,debias-divide,no-debias-no-dedup]
model=${1:?}; layer=${2:?}; out=${3:?}; only=${4:-main,no-segment-mask,no-debias,no-dedup}
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
table debias-divide --methods none,sharp --debias divide
table no-debias-no-dedup --methods none,sharp --debias none --no-dedup

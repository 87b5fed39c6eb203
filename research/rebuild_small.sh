#!/usr/bin/env bash
# Rebuild sharp-small p5 from nothing, one stage at a time, as the lost checkpoints were made
# (research/rebuild_small.md: where each line comes from, and what cannot be reproduced exactly).
# Usage (device machine, repo root; carry .whl-tf, and ckpt/<parent> when the parent came from an earlier call):
#   bash research/rebuild_small.sh OUT STAGE [STAGE...]
# Stages, in order: r1 r2 pr1 p1 p1c p1q p1r p2q p2q-s0.25 p3 p3-nopair5 p3-hinge p4 p5; the short line
# from r2: q0 (one surgery), then q1 q2 ... and d1 d2 ... (7 minutes each; MINUTES=N to change)
# One training stage per call (a call has 600 s), e.g.:
#   r1 | r2 | pr1 p1 | p1c p1q p1r p2q | p2q-s0.25 p3 | p3-nopair5 p3-hinge p4 | p5
# Each stage writes /tmp/<stage> and reads its parent from /tmp/<parent> (made earlier on this warm
# machine) or ckpt/<parent> (carried: `cat OUT/<parent>.tgz.part-* | tar -xzf - -C ckpt`).
# Training stages return their model as OUT/<stage>.tgz.part-* (gpu_train_small.sh; RETURN=0: not);
# surgery stages (plant_priors, graft_tensors; CPU only, ~25 s each there) return only their print, as
# they are cheap to redo from a carried parent. pr1 also returns OUT/pr1-shallow-qk.safetensors (0.5 MB):
# carry it as ckpt/pr1-shallow-qk.safetensors so that p1q needs no full pr1 in a later call.
# Surgery stages also run on this CPU: SHARP_SETUP_DONE=1 PYTHON=.venv/bin/python bash research/rebuild_small.sh OUT pr1
# WORKERS=N overrides a stage's recorded data workers (a stage alone on the machine can take 14: the
# items are the same, only their pace differs).
# PIN_STEPS=1 (default) ends each training stage at the step count its log recorded (--steps N, with
# the recorded minutes still the limit): the same items and number of updates as the lost run, which
# stopped on the clock. PIN_STEPS=0 runs the recorded minutes alone.
out=${1:?usage: bash research/rebuild_small.sh OUT STAGE [STAGE...]}; shift
mkdir -p "$out"
[ -n "${SHARP_SETUP_DONE:-}" ] || source research/gpu_setup.sh
py=${PYTHON:-python3}
qk='^model\.layers\.[012]\.self_attn\.[qk]_proj'  # layers 0-2's query/key, as saved (legacy key names)

where() {  # the folder of checkpoint $1: made on this machine, else carried
  local d
  for d in "/tmp/$1" "ckpt/$1"; do [ -f "$d/training.json" ] && { echo "$d"; return 0; }; done
  echo "rebuild_small: no $1 in /tmp or ckpt" >&2; return 1
}

steps() { [ "${PIN_STEPS:-1}" = 1 ] && echo " --steps $1"; }  # the recorded step count, when pinned

report() {  # the new checkpoint's data range beside the lost one's (training.json's items_to), into the
  # stage's log (a call returns at most 8 files: two arms' 3 parts and a log each fill them)
  local into="$out/$1.log"; [ -f "$into" ] || into="$out/$1.txt"
  $py -c "import json; d = json.load(open('/tmp/$1/training.json')); t = d.get('items_to')
print('$1: items_to', t, '(lost: $2)', 'steps', d.get('steps'), '' if '$2' in ('-', str(t)) else 'DIFFERS')" \
    | tee -a "$into"
}

train() {  # train NAME PARENT|none WORKERS VARLEN ITEMS_TO "MINUTES ARGS" ...
  local name=$1 init=$2 workers=${WORKERS:-$3} varlen=$4 items=$5; shift 5
  [ "$init" = none ] || init=$(where "$init") || exit 1
  rm -rf "/tmp/$name" "/tmp/$name-prev"
  # SHARP_VISION_VARLEN: the vision tower's attention path of the time (0: grouped SDPA, before the
  # varlen default of 2026-12-05 18:02); the same attention either way, bf16 rounding apart.
  SHARP_VISION_VARLEN=$varlen INIT=$init WORKERS=$workers bash research/gpu_train_small.sh "$out" "$name" "$@"
  [ -f "/tmp/$name/training.json" ] || { echo "rebuild_small: $name left no model" >&2; exit 1; }
  report "$name" "$items"
}

surgery() {  # surgery NAME ITEMS_TO MODULE ARGS...: a CPU step, its print in OUT/NAME.txt
  local name=$1 items=$2 module=$3; shift 3
  rm -rf "/tmp/$name"
  echo "== $name: python -m $module $*" > "$out/$name.txt"
  $py -m "$module" "$@" >> "$out/$name.txt" 2>&1 || { tail -20 "$out/$name.txt"; exit 1; }
  grep -v '^layer' "$out/$name.txt" | tail -4
  report "$name" "$items"
}

for stage in "$@"; do
  echo "== rebuild_small: $stage ($(date -u +%H:%M:%S))"
  case $stage in
    # r1: from scratch, RoPE theta 1e6; language alone, then mixed. H200, beside s4, 7 workers.
    # --warmup-steps 0: r1 and r2 ran before the 100-step warm-up became the default.
    r1) train r1 none 7 0 31808 "2 --language 1.0 --rope-theta 1e6 --warmup-steps 0$(steps 463)" \
          "5.5 --language 0.35 --warmup-steps 0$(steps 531)" ;;
    # r2: r1 continued. H200, beside m1 and w1, 6 workers; --profile 4 only prints (as recorded).
    r2) train r2 r1 6 0 53696 "7 --language 0.35 --eval-every 0 --check-items 12 --profile 4 --warmup-steps 0$(steps 684)" ;;
    # pr1: r2 with sinks (85%) and a recency line (0.5 logits a token frame, pair 5, layers 1-2) planted,
    # the rotary bands moved to 8,4,4. Untrained: p1's start, and the donor of p1q's shallow query/key.
    pr1) r2=$(where r2) || exit 1
         surgery pr1 53696 scripts.plant_priors "$r2" /tmp/pr1 --mrope-section 8,4,4 --recency-layers 1,2
         $py - /tmp/pr1/model.safetensors "$out/pr1-shallow-qk.safetensors" "$qk" <<'EOF'
import re, sys
from safetensors.torch import load_file, save_file
picked = {k: v.contiguous() for k, v in load_file(sys.argv[1]).items() if re.search(sys.argv[3], k)}
save_file(picked, sys.argv[2])
print(len(picked), "tensors ->", sys.argv[2])
EOF
         ;;
    # p1: pr1 trained, compiled. H100, alone, 14 workers.
    p1) train p1 pr1 14 0 72672 "7.6 --language 0.35 --compile inductor$(steps 593)" ;;
    # p1c: p1's sinks calibrated again to 85% (the circuit is found in its history, not planted twice).
    p1c) p1=$(where p1) || exit 1
         surgery p1c 72672 scripts.plant_priors "$p1" /tmp/p1c ;;
    # p1q: p1c with layers 0-2's query/key projections put back as pr1 had them.
    p1q) base=$(where p1c) || exit 1
         if donor=$(where pr1 2>/dev/null); then match=(--match "$qk")  # the whole pr1: pick the tensors
         elif [ -f ckpt/pr1-shallow-qk.safetensors ]; then donor=ckpt/pr1-shallow-qk.safetensors; match=()
         else echo "rebuild_small: p1q needs pr1 or ckpt/pr1-shallow-qk.safetensors" >&2; exit 1; fi
         surgery p1q 72672 research.graft_tensors "$base" "$donor" /tmp/p1q "${match[@]}" ;;
    # p1r: p1q's sinks calibrated to 92%.
    p1r) p1q=$(where p1q) || exit 1
         surgery p1r 72672 scripts.plant_priors "$p1q" /tmp/p1r --target 0.92 ;;
    # p2q: p1r trained with the circuits held and layers 0-2's query/key frozen. H100, alone, 14 workers.
    p2q) train p2q p1r 14 0 90336 "5.6 --language 0.35 --compile inductor --hold-planted --freeze-qk-layers 0,1,2$(steps 552)" ;;
    # p2q-s0.25: the recency line set to 0.25 a token frame, sinks calibrated to 95%.
    p2q-s0.25) p2q=$(where p2q) || exit 1
         surgery p2q-s0.25 90336 scripts.plant_priors "$p2q" /tmp/p2q-s0.25 --target 0.95 --recency-layers 1,2 --slope 0.25 ;;
    # p3: p2q-s0.25 trained. H100, beside p3h, 7 workers.
    p3) train p3 p2q-s0.25 7 0 107552 "7 --language 0.35 --compile inductor --hold-planted --freeze-qk-layers 0,1,2$(steps 538)" ;;
    # p3-nopair5: pair 5's line taken away (slope 0), sinks left as they are (--target 0).
    p3-nopair5) p3=$(where p3) || exit 1
         surgery p3-nopair5 107552 scripts.plant_priors "$p3" /tmp/p3-nopair5 --target 0 --recency-layers 1,2 --slope 0 --recency-pair 5 ;;
    # p3-hinge: a hinge of 0.5 from pairs 2-4 at layers 1-2, sinks calibrated to 95%.
    p3-hinge) nop5=$(where p3-nopair5) || exit 1
         surgery p3-hinge 107552 scripts.plant_priors "$nop5" /tmp/p3-hinge --target 0.95 --recency-layers 1,2 --slope 0.5 --hinge-pairs 2,3,4 ;;
    # p4: p3-hinge trained. H100, beside p4f, 7 workers.
    p4) train p4 p3-hinge 7 0 125408 "7 --language 0.35 --compile inductor --hold-planted --freeze-qk-layers 0,1,2$(steps 558)" ;;
    # p5: p4 trained with the retrieval loss on layer 6. H100, beside p5c, 7 workers; the varlen
    # vision attention was the default by then.
    p5) train p5 p4 7 1 143104 "6.6 --language 0.35 --compile inductor --hold-planted --freeze-qk-layers 0,1,2 --retrieval-layer 6$(steps 553)" ;;
    # The short line (research/gpu-notes.md, 2026-12-05 ninth session): r2 planted once with the circuits p4
    # ended with (bands 8,4,4, the hinge at layers 1-2, sinks at 95%), then trained as p5 was, with layers
    # 0-2's query/key frozen from the start (no p1-p3 detour): q1, q2, ... each 7 minutes from the last;
    # d1, d2, ... the same with the deep layers' visual drop on half the video rows (--drop-visual-share).
    q0) r2=$(where r2) || exit 1
        surgery q0 - scripts.plant_priors "$r2" /tmp/q0 --mrope-section 8,4,4 --recency-layers 1,2 --slope 0.5 \
          --hinge-pairs 2,3,4 --target 0.95 ;;
    q[1-9]|d[1-9])
        n=${stage:1}; parent=${stage:0:1}$((n - 1)); [ "$parent" = d0 ] && parent=q0
        extra=""; [ "${stage:0:1}" = d ] && extra=" --drop-visual-share 0.5 --drop-visual-from 8"
        train "$stage" "$parent" 7 1 - "${MINUTES:-7} --language 0.35 --compile inductor --hold-planted \
--freeze-qk-layers 0,1,2 --retrieval-layer 6$extra" ;;
    *) echo "rebuild_small: unknown stage $stage" >&2; exit 2 ;;
  esac
done
ls -la "$out"

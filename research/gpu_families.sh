#!/usr/bin/env bash
# The runs behind docs/benchmarks.md's H200 tables, in one device call: the segment-attention check,
# then Qwen2.5-VL-7B, LLaVA-OneVision-7B (32 frames) and LLaVA-Video-7B (64 frames) in bf16 and nf4;
# random weights, K=2, ratio 0.15, every method.
# Usage (device machine, repo root): source research/gpu_setup.sh; bash research/gpu_families.sh OUT_DIR [SECONDS]
# Each step gets what is left of the time budget, so a slow step costs only the later ones.
out=${1:?output folder}; budget=${2:-560}
end=$((SECONDS + budget))
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
log="$out/$gpu-families.log"
step() {  # step NAME ARGS...: one bench, its JSON to $out/$gpu-NAME.json, tables to the log
  local name=$1; shift; local left=$((end - SECONDS))
  if [ "$left" -lt 40 ]; then echo "## $name: skipped, ${left}s left" >> "$log"; return; fi
  echo "## $name: sharp bench $* (${left}s left)" >> "$log"
  local t0=$SECONDS
  timeout "$left" python3 -m sharp_cli bench --random-weights --ratio 0.15 --layer 2 --warmup 2 --iters 5 "$@" \
    --output-json "$out/$gpu-$name.json" >> "$log" 2>&1 || echo "## $name: exit $?" >> "$log"
  echo "## $name: $((SECONDS - t0)) s" >> "$log"
}
nvidia-smi -L >> "$log"; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$log"
ov=llava-hf/llava-onevision-qwen2-7b-ov-hf; video=llava-hf/LLaVA-Video-7B-Qwen2-hf
python3 -m research.segment_attention_check > "$out/$gpu-segment-attention.txt" 2>&1
python3 -m research.segment_attention_check --segment 196 >> "$out/$gpu-segment-attention.txt" 2>&1
python3 -m research.segment_attention_check --tokens 12544 --segment 196 >> "$out/$gpu-segment-attention.txt" 2>&1
step qwen25vl7b-bf16-6272 --quant none --frames 32
step llava-ov7b-bf16-6272 -m $ov --quant none --frames 32
step llava-video7b-bf16-12544 -m $video --quant none --frames 64
step qwen25vl7b-nf4-6272 --quant nf4 --frames 32
step llava-ov7b-nf4-6272 -m $ov --quant nf4 --frames 32
step llava-video7b-nf4-12544 -m $video --quant nf4 --frames 64

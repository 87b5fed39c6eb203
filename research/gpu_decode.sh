#!/usr/bin/env bash
# The runs behind docs/benchmarks.md's decode and end-to-end sections, in one device call:
# the CUDA checks, then `sharp bench` against the stock transformers path, then the decode profile.
# Usage (device machine, repo root): source research/gpu_setup.sh; bash research/gpu_decode.sh OUT_DIR [SECONDS] [STEPS]
# STEPS: a comma list of step names to run (default: all), run in the order of this file. Each step gets what is left of the
# budget, so a slow step costs only the later ones. 128 frames: --max-pixels 392x784 keeps every frame at
# 392x784 (the processor's clip budget would shrink them), 25,088 visual tokens.
out=${1:?output folder}; budget=${2:-560}; only=${3:-all}
end=$((SECONDS + budget))
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
log="$out/$gpu-decode.log"
step() {  # step NAME COMMAND...: output to the log, JSON (if any) to $out
  local name=$1; shift; local left=$((end - SECONDS))
  case ",$only," in *",$name,"*|*",all,"*) ;; *) return ;; esac
  if [ "$left" -lt 30 ]; then echo "## $name: skipped, ${left}s left" >> "$log"; return; fi
  echo "## $name: $* (${left}s left)" >> "$log"
  local t0=$SECONDS
  timeout "$left" "$@" >> "$log" 2>&1 || echo "## $name: exit $?" >> "$log"
  echo "## $name: $((SECONDS - t0)) s" >> "$log"
}
# An array, not a function: `timeout` runs programs, and a shell function is none.
bench=(python3 -m sharp_cli bench --random-weights --ratio 0.15 --layer 2 --warmup 2 --iters 5 --decode-tokens 64)
nvidia-smi -L >> "$log"; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$log"
step gemv python3 -m scripts.kernel_bench --sweep --json "$out/$gpu-gemv-bf16.json"
step bench-bf16 "${bench[@]}" --quant none --methods transformers,none,fastv,random,sharp --output-json "$out/$gpu-e2e-bf16-6272.json"
step bench-bf16-cublas env SHARP_GEMV=0 "${bench[@]}" --quant none --methods none,sharp --output-json "$out/$gpu-e2e-bf16-6272-cublas.json"
step bench-compile "${bench[@]}" --quant none --compile --methods transformers,transformers-static,none,sharp --output-json "$out/$gpu-e2e-compiled-6272.json"
step bench-compile-rows "${bench[@]}" --quant none --compile --methods none,sharp --output-json "$out/$gpu-e2e-compiled-6272-rows.json"
step bench-compile-cublas env SHARP_GEMV=0 "${bench[@]}" --quant none --compile --methods none,sharp --output-json "$out/$gpu-e2e-compiled-6272-cublas.json"
step serve python3 -m scripts.serve_bench --processes 4 --seconds 150 --output "$out/$gpu-serve-bench.json"
step serve-stop bash research/serve_stop_check.sh "$out" ask
step serve-stop-idle bash research/serve_stop_check.sh "$out" idle
step signal-owner python3 -m research.signal_owner --random-weights --quant none
step memory-growth python3 -m research.memory_growth
step check-bf16 python3 -m scripts.cuda_check --frames 8
step bench-128-compile "${bench[@]}" --quant none --compile --frames 128 --max-pixels 307328 --methods none,sharp --iters 3 --warmup 1 --output-json "$out/$gpu-e2e-compiled-25088.json"
step profile-vision python3 -m scripts.profiler vision --compile
step profile-vision-default python3 -m scripts.profiler vision  # the default tower (kernels on), eager: where its 93 ms go
step profile-questions python3 -m scripts.profiler questions
step profile-compile python3 -m scripts.profiler decode --quant none --compile
step profile-bf16 python3 -m scripts.profiler decode --quant none
# q/k/v and gate/up as one product each (models/gemv_groups.py, off by default): the check, the same bench's
# sharp rows and the step's profile with it on, beside bench-bf16 and profile-bf16 of the same call
step check-bf16-groups env SHARP_GEMV_GROUPS=1 python3 -m scripts.cuda_check --frames 8
step bench-bf16-groups env SHARP_GEMV_GROUPS=1 "${bench[@]}" --quant none --methods none,sharp --output-json "$out/$gpu-e2e-bf16-6272-groups.json"
step profile-bf16-groups env SHARP_GEMV_GROUPS=1 python3 -m scripts.profiler decode --quant none
step bench-static "${bench[@]}" --quant none --methods transformers-static,none,sharp --output-json "$out/$gpu-e2e-static-6272.json"
step bench-nf4 "${bench[@]}" --quant nf4 --methods transformers,none,fastv,random,sharp --output-json "$out/$gpu-e2e-nf4-6272.json"
step profile-nf4 python3 -m scripts.profiler decode --quant nf4
# sharp's 4-bit kernel (models/gemv_nf4.py, on by default since these passed on an H200, 2026-12-05): products
# against bitsandbytes per shape and a whole step, then graph == eager == generate() with it, the bench, the
# profile; bench-nf4-bnb is the same bench with bitsandbytes' own products (the A/B, run in the same call)
step bench-nf4-bnb env SHARP_GEMV_NF4=0 "${bench[@]}" --quant nf4 --methods none,sharp --output-json "$out/$gpu-e2e-nf4-6272-bnb.json"
step gemv-nf4 python3 -m scripts.kernel_bench --nf4 --json "$out/$gpu-gemv-nf4.json"
step check-nf4-kernel env SHARP_GEMV_NF4=1 python3 -m scripts.cuda_check --frames 8 --quant nf4
step bench-nf4-kernel env SHARP_GEMV_NF4=1 "${bench[@]}" --quant nf4 --methods none,sharp --output-json "$out/$gpu-e2e-nf4-6272-kernel.json"
step profile-nf4-kernel env SHARP_GEMV_NF4=1 python3 -m scripts.profiler decode --quant nf4
# sharp's fused step glue (models/fused_step.py, off by default until these pass): each piece and a layer against
# transformers' (exit 1 on a difference), decode against eager and generate(), then the step against profile-bf16/-nf4
# and bench-bf16 (run those in the same call)
step fused-glue python3 -m scripts.kernel_bench --fused --json "$out/$gpu-fused-glue.json"
step check-fused env SHARP_FUSED_STEP=1 python3 -m scripts.cuda_check --frames 8
step profile-fused env SHARP_FUSED_STEP=1 python3 -m scripts.profiler decode --quant none
step bench-fused env SHARP_FUSED_STEP=1 "${bench[@]}" --quant none --methods none,sharp --output-json "$out/$gpu-e2e-bf16-6272-fused.json"
step profile-nf4-fused env SHARP_FUSED_STEP=1 python3 -m scripts.profiler decode --quant nf4
# the vision tower (issue 26 item 3): sharp's features against the stock tower's (fp32 reference for bf16 rounding)
# and its time eager / fused MLP / CUDA graph per shape, Qwen2.5-VL-7B then Qwen3-VL-8B (<2 min each; exit 1 on a
# difference); then the graphs end to end (SHARP_VISION_GRAPHS=1, off by default) against bench-bf16's rows
step vision-check python3 -m research.vision_check --json "$out/$gpu-vision-check.json"
step vision-check-qwen3 python3 -m research.vision_check -m Qwen/Qwen3-VL-8B-Instruct --json "$out/$gpu-vision-check-qwen3.json"
step bench-vision-graphs env SHARP_VISION_GRAPHS=1 "${bench[@]}" --quant none --methods none,sharp --output-json "$out/$gpu-e2e-bf16-6272-vision-graphs.json"
step bench-128 "${bench[@]}" --quant none --frames 128 --max-pixels 307328 --methods none,sharp --iters 3 --warmup 1 --output-json "$out/$gpu-e2e-bf16-25088.json"
step check-small python3 -m scripts.cuda_check -m llava-hf/llava-onevision-qwen2-0.5b-ov-hf --quant int8 --skip bounded
step check-fp16 python3 -m scripts.cuda_check -m llava-hf/llava-onevision-qwen2-0.5b-ov-hf --dtype float16 --skip bounded

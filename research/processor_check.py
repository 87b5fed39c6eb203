"""The video processor on the GPU (SHARP_PROCESS_ON_GPU=1) against the CPU: same inputs, time saved.

For each model config: a synthetic 8 s clip of 32 frames at 640x360 (the throughput bench's), its
processor inputs made on the CPU and on CUDA through `adapter.processor_inputs`, then the largest
difference of the pixel values (relative to their spread) and equality of everything else, and the
median of 5 timed calls each (after one untimed), CUDA synchronised. Exit 1 if any input other than
the pixels differs or the pixels differ by more than 2% of their spread (a uint8 step is ~0.8%).

    python -m research.processor_check          # on the GPU machine, after research/gpu_setup.sh
"""

from __future__ import annotations

import sys

MODELS = ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-8B-Instruct", "llava-hf/llava-onevision-qwen2-7b-ov-hf")


def main() -> int:
    import tempfile
    from pathlib import Path

    import torch

    from scripts.profiler import timed_wall
    from sharp_cli.bench import synthetic_clip
    from sharp_cli.evaluate.synth import write_mp4
    from sharp_cli.models import adapter_for, random_init
    from sharp_cli.video import load_video

    path = Path(tempfile.mkdtemp()) / "clip.mp4"
    write_mp4(synthetic_clip(32, 360, 640).frames, path, 4.0)
    clip = load_video(path, frames=32)
    failed = False
    for name in MODELS:
        config = random_init.load_config(name)
        adapter = adapter_for(config)
        tokenizer = random_init.synthetic_tokenizer(adapter.special_tokens(config), config.text_config.vocab_size)
        processor = adapter.build_processor(tokenizer, config)
        prompt = adapter.prompt(processor, "what happens?")
        on_cpu = lambda: adapter.processor_inputs(processor, prompt, clip, None).to("cuda")  # noqa: E731
        on_gpu = lambda: adapter.processor_inputs(processor, prompt, clip, None, torch.device("cuda"))  # noqa: E731
        cpu, gpu = on_cpu(), on_gpu()
        cpu_ms, gpu_ms = timed_wall(on_cpu), timed_wall(on_gpu)
        pixels = "pixel_values_videos"
        spread = (cpu[pixels].max() - cpu[pixels].min()).item()
        diff = (cpu[pixels].float() - gpu[pixels].float()).abs().max().item() / spread
        others = all(torch.equal(cpu[k], gpu[k].to(cpu[k].device)) for k in cpu
                     if k != pixels and isinstance(cpu[k], torch.Tensor))
        ok = others and diff <= 0.02
        failed |= not ok
        print(f"[{'ok' if ok else 'FAIL'}] {name}: pixels {tuple(cpu[pixels].shape)} differ by {diff:.2e} of their "
              f"spread, other inputs equal: {others}; CPU {cpu_ms:.1f} ms (with the copy to the GPU), "
              f"GPU {gpu_ms:.1f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

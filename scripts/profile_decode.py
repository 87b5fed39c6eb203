"""Where decode time goes: per-step wall times and the top CUDA/CPU ops of a few steps.

    python scripts/profile_decode.py [--method sharp] [--quant none]
"""

from __future__ import annotations

import argparse
import time

import torch

from sharp_cli import engine, loading
from sharp_cli.decode import decode
from sharp_cli.prior_pass import positional_prior
from sharp_cli.compat import cache_kwargs
from sharp_cli.bench import synthetic_clip
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--methods", default="none,random")
    ap.add_argument("--quant", default="none")
    args = ap.parse_args()
    loaded = loading.load(args.model, device="cuda", quant=args.quant, random_weights=True)
    clip = synthetic_clip(32, 392, 784)
    for method in args.methods.split(","):
        profile_one(loaded, clip, PruneConfig(method=method).validate(loaded.num_layers), args.quant)


def profile_one(loaded, clip, cfg, quant):
    inputs = engine.prepare(loaded, clip, "What happens in this video?")
    encoded, _ = engine.encode(loaded, inputs)
    prior = positional_prior(loaded, clip, encoded, cfg, PriorStore(use_disk=False))
    for _ in range(2):
        state = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
        decode(loaded, encoded, state, 4)
    state = engine.prefill(loaded, encoded, cfg, prior=prior.prior)
    text, head = loaded.adapter.text_model(loaded.model), loaded.adapter.lm_head(loaded.model)
    token = state.next_token
    steps = []
    with torch.inference_mode():
        for step in range(12):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = text(inputs_embeds=loaded.adapter.embed(loaded.model, token),
                       position_ids=loaded.adapter.decode_position(encoded, step), use_cache=True,
                       **cache_kwargs(text, state.cache))
            token = head(out.last_hidden_state[:, -1:]).argmax(-1)
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - t0)
        print(f"{cfg.method}/{quant}: decode step ms:", " ".join(f"{s * 1e3:.1f}" for s in steps))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for step in range(12, 15):
                out = text(inputs_embeds=loaded.adapter.embed(loaded.model, token),
                           position_ids=loaded.adapter.decode_position(encoded, step),
                           use_cache=True, **cache_kwargs(text, state.cache))
                token = head(out.last_hidden_state[:, -1:]).argmax(-1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()

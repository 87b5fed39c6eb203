"""The stock transformers path, measured beside sharp's rows in `sharp bench`.

`transformers`: `model.generate(**inputs, do_sample=False)` with its default dynamic cache.
`transformers-static`: the same with `cache_implementation="static"`, which transformers compiles
(torch.compile, reduce-overhead) on CUDA, as its docs recommend for speed. Both get the very
processor inputs sharp's rows get, and run with stock SDPA attention everywhere (sharp's attention
functions switched off), so what they measure is what a user of plain transformers waits for.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

from sharp_cli.models import gemv, vision_attention, vision_mlp

PEERS = ("transformers", "transformers-static")


@contextmanager
def stock_attention(loaded):
    """transformers' own SDPA in the text model and the vision tower, cuDNN's attention kernels
    the vision MLPs' stock widths and cuBLAS for every product, for the duration."""
    import torch

    configs = [loaded.adapter.text_model(loaded.model).config]
    visual = vision_attention.vision_tower(loaded.model)
    if visual is not None:
        configs.append(visual.config)
    saved = [c._attn_implementation for c in configs]
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    for c in configs:
        c._attn_implementation = "sdpa"
    torch.backends.cuda.enable_cudnn_sdp(True)  # PyTorch's default, which sharp turns off (loading.py)
    try:
        with vision_mlp.unpadded(visual) if visual is not None else nullcontext(), \
                gemv.stock_linears(loaded.model):
            yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        for c, name in zip(configs, saved):
            c._attn_implementation = name


class _FirstToken:
    """A generate() streamer that only notes when the first new token reached the host. generate()
    hands it the prompt first, then each token after a device sync of its own, so this adds none."""

    def __init__(self):
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate(loaded, inputs, peer: str, new_tokens: int) -> dict:
    """One timed generate() call: {tokens, seconds (wall, whole call), ttft_seconds}."""
    import torch

    from sharp_cli import measure

    streamer = _FirstToken()
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer)
    if peer == "transformers-static":
        kwargs["cache_implementation"] = "static"
    with stock_attention(loaded), torch.inference_mode():
        measure.synchronize(loaded.device)
        start = time.perf_counter()
        out = loaded.model.generate(**inputs, **kwargs)
        measure.synchronize(loaded.device)
        seconds = time.perf_counter() - start
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    ttft = (streamer.at - start) if streamer.at is not None else seconds
    return {"tokens": tokens, "seconds": seconds, "ttft_seconds": ttft}

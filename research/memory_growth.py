"""Where a process's GPU memory grows over many questions of different lengths (CUDA).

cuda_check.py's bounded-memory check asks questions of 4..24 frames and watches
torch.cuda.memory_allocated(); this asks the same questions and, after each, also measures it after a
full garbage collection, then at the end after dropping the KV pool and the prefill graphs, and
lists the largest live CUDA tensors by shape: what is holding the memory.

    python -m research.memory_growth
"""

from __future__ import annotations

import collections
import gc

import torch

from sharp_cli import loading
from sharp_cli.answer import ask
from sharp_cli.bench import synthetic_clip
from sharp_cli.prune import PruneConfig
from sharp_cli.prune.prior import PriorStore


def gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def live_cuda_tensors(top: int = 8) -> list[str]:
    sizes = collections.Counter()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and not isinstance(obj, torch.nn.Parameter):
                sizes[(tuple(obj.shape), str(obj.dtype))] += obj.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse isinstance
            continue
    return [f"{shape} {dtype}: {gib(n)} GiB" for (shape, dtype), n in sizes.most_common(top)]


def main() -> None:
    loaded = loading.load("Qwen/Qwen2.5-VL-7B-Instruct", quant="none", random_weights=True)
    cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.15))
    print("question frames allocated after-gc caches decode-graphs tail-graphs")
    for i, frames in enumerate((4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 4, 8, 16)):
        clip = synthetic_clip(frames, 392, 784, seed=frames)
        ask(loaded, clip, "What happens in this video?", loaded.resolve_prune(cfg), max_new_tokens=16,
            store=PriorStore(use_disk=False))
        before = torch.cuda.memory_allocated()
        gc.collect()
        print(i, frames, gib(before), gib(torch.cuda.memory_allocated()), len(loaded.kv_pool),
              loaded.kv_pool.graph_count(), len(loaded.graphs), flush=True)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    print("parameters", gib(weights), "GiB; KV pool buffers", gib(loaded.kv_pool.bytes_allocated()))
    print("largest live CUDA tensors (not parameters):", *live_cuda_tensors(), sep="\n  ")
    loaded.kv_pool.clear()
    loaded.use_cuda_graphs(True)  # a fresh TailGraphs: the old graphs go
    gc.collect()
    print("after dropping the KV pool and the prefill graphs:", gib(torch.cuda.memory_allocated()), "GiB")
    print("largest live CUDA tensors now:", *live_cuda_tensors(), sep="\n  ")
    torch._C._cuda_clearCublasWorkspaces()  # one per (handle, stream) cuBLAS has run on
    print("after freeing cuBLAS's workspaces:", gib(torch.cuda.memory_allocated()), "GiB")


if __name__ == "__main__":
    main()

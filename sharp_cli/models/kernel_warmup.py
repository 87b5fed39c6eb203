"""Triton's once-per-process set-up, done beside the weights' load instead of in the first question.

Why: a fresh process's first question paid for Triton twice over, and stock transformers (which runs
no Triton kernel) pays neither:
- the first launch of any Triton kernel computes `triton_key()`, a SHA-256 of Triton's own compiler
  sources and of libtriton (hundreds of MB), before it can look a kernel up in its on-disk cache:
  0.38 s of a 1.67 s first question on an H200 (`python -m research.first_question`,
  research/results/h200-first-question-*.txt);
- then each kernel's first launch in each specialization (dtypes, the constexpr block sizes the
  model's widths give, integer arguments equal to 1 or divisible by 16) builds the kernel's argument
  binder, reads the compiled kernel from that cache and loads it onto the GPU: 0.17 s of 261 first
  launches in a 1.00 s first question on an H100, with the key already hashed during the load
  (research/results/h100-first-question-bf16-s8.txt).
A thread started before from_pretrained does both while the weights load (seconds of I/O; hashlib
lets go of the GIL on large buffers): it computes the key, and once _load_weights has read the
model's config (`Warmup.shapes`), launches each of sharp's kernels once on small tensors of the
model's dtype, shaped as its first question's one-token decode step and vision tower will call them
(`warm_kernels`). load() waits for the thread before returning, so the first question finds both done
(`functools.lru_cache` in Triton; each kernel's in-memory cache).

A warm-up, nothing more: any failure (another Triton without the function, an unreadable file, a
config without the expected widths) is ignored, and the first launches then pay as before. The
tensors are a few KB; every launch reads and writes inside them.
"""

from __future__ import annotations

import queue
import threading

JOIN_SECONDS = 30.0  # past this, load() goes on; the first launches then pay for themselves


class Warmup:
    """The warm-up thread: the key at once, then the kernels for the shapes handed to `shapes`."""

    def __init__(self, device, key_function):
        self.device, self.key_function = device, key_function
        self.work: queue.SimpleQueue = queue.SimpleQueue()  # (config, dtype), or None: no kernels to warm
        self.launches = 0
        self.thread = threading.Thread(target=self._run, name="sharp-triton-warmup", daemon=True)

    def shapes(self, config, dtype) -> None:
        """The model's config (its text and vision widths) and dtype: the kernels are warmed for them."""
        self.work.put((config, dtype))

    def _run(self) -> None:
        try:
            self.key_function()
        except Exception:  # noqa: BLE001 - a warm-up: the first kernel launch computes it instead
            pass
        try:
            item = self.work.get(timeout=JOIN_SECONDS)
        except queue.Empty:
            return
        if item is not None:
            try:
                self.launches = _on_device(self.device, warm_kernels, item[0], self.device, item[1])
            except Exception:  # noqa: BLE001 - a warm-up: the first question launches them instead
                pass


def start(device) -> Warmup | None:
    """A started Warmup when sharp will launch Triton kernels on `device` (CUDA, a kernel switched
    on); None otherwise. A device without an index is the calling thread's current one (a sharded
    eval sets it per rank): the thread launches there, not on its own default, GPU 0."""
    if device.type != "cuda" or not _uses_triton(device):
        return None
    key_function = _key_function()
    if key_function is None:
        return None
    if device.index is None:
        import torch

        device = torch.device("cuda", torch.cuda.current_device())
    warmup = Warmup(device, key_function)
    warmup.thread.start()
    return warmup


def finish(warmup: Warmup | None) -> None:
    """Wait for start()'s thread (bounded): a kernel compiled by two threads at once is compiled twice."""
    if warmup is not None:
        warmup.work.put(None)  # a load that never read a config (it failed first) warms no kernel
        warmup.thread.join(JOIN_SECONDS)


def warm_kernels(config, device, dtype) -> int:
    """Launches each of sharp's Triton kernels that `device` runs, once per specialization the model's
    first question needs, on small tensors; returns how many launches. Text (one token, batch 1:
    models/fused_step.py, models/gemv.py): the RMSNorm over the hidden width and over a head (Qwen3-VL's
    q_norm and k_norm), the rotary embedding of q and k as views of their products, SiLU(gate) * up,
    and the matrix-vector product per (output rows, input width, bias) of the decoder's and the
    lm_head's linears, with 16 rows instead of n where n is a multiple of 16 (the block sizes come from
    the real n: gemv.block_sizes). Vision (models/fused_vision.py): the RMSNorm over the tower's width,
    SiLU(gate) * up, and the rotary embedding of q and k as views of the qkv product, on 16 rows."""
    import torch

    from sharp_cli.models import fused_step, fused_vision, gemv, gemv_groups

    text = getattr(config, "text_config", config)
    width, heads = text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", heads)
    head_dim = getattr(text, "head_dim", None) or width // heads
    inner, vocab = text.intermediate_size, text.vocab_size
    eps = getattr(text, "rms_norm_eps", 1e-6)
    zeros = lambda *shape, kind=dtype: torch.zeros(shape, device=device, dtype=kind)  # noqa: E731
    launches = 0
    if fused_step.available(device):
        fused_step.rms_norm(zeros(1, 1, width), zeros(width), eps)
        fused_step.rms_norm(zeros(1, 1, heads, head_dim), zeros(head_dim), eps)
        q = zeros(1, 1, heads * head_dim).view(1, 1, heads, head_dim).transpose(1, 2)  # (1, heads, 1, d)
        k = zeros(1, 1, kv_heads * head_dim).view(1, 1, kv_heads, head_dim).transpose(1, 2)
        fused_step.rotary(q, k, zeros(1, 1, head_dim), zeros(1, 1, head_dim))
        fused_step.silu_mul(zeros(1, 1, inner), zeros(1, 1, inner))
        launches += 4
    if gemv.available(device):
        bias = getattr(text, "attention_bias", True)  # Qwen2's q, k and v carry one; Qwen3-VL's say so
        products = {(heads * head_dim, width, bias), (kv_heads * head_dim, width, bias),
                    (width, heads * head_dim, False), (inner, width, False), (width, inner, False),
                    (vocab, width, False)}
        if gemv_groups.on():  # q, k, v and gate, up as one product each
            products |= {((heads + 2 * kv_heads) * head_dim, width, bias), (2 * inner, width, False)}
        for n, k_in, has_bias in sorted(products):
            rows = n if n % 16 else 16  # Triton specializes integers divisible by 16, not their size
            gemv.gemv(zeros(1, 1, k_in), zeros(rows, k_in), zeros(rows) if has_bias else None,
                      sizes=gemv.block_sizes(n, k_in))
            launches += 1
    vision = getattr(config, "vision_config", None)
    if vision is not None and fused_vision.available(device):
        v_width = vision.hidden_size
        v_heads = getattr(vision, "num_heads", None) or vision.num_attention_heads
        v_dim = v_width // v_heads
        fused_step.rms_norm(zeros(16, v_width), zeros(v_width), 1e-6)
        fused_step.silu_mul(zeros(16, vision.intermediate_size), zeros(16, vision.intermediate_size))
        qkv = zeros(16, 3, v_heads, v_dim)
        cos = zeros(16, v_dim, kind=torch.float32)  # the towers' rotary tables stay float32
        fused_vision.vision_rotary(qkv[:, 0], qkv[:, 1], cos, cos)
        launches += 3
    return launches


def _on_device(device, function, *args):
    """function(*args) with `device` the thread's current CUDA device (Triton launches on the current
    one; each thread starts on GPU 0)."""
    if device.type != "cuda":
        return function(*args)
    import torch

    with torch.cuda.device(device.index):
        return function(*args)


def _key_function():
    """Triton's cached cache-key function, where this Triton has it (3.x: triton.runtime.cache)."""
    try:
        from triton.runtime import cache
    except ImportError:
        return None
    return getattr(cache, "triton_key", None)


def _uses_triton(device) -> bool:
    from sharp_cli.models import fused_step, fused_vision, gemv, gemv_nf4

    return any(kind.available(device) for kind in (fused_step, fused_vision, gemv, gemv_nf4))

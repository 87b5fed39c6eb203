"""models/kernel_warmup.py: Triton's per-process key is computed beside the weights' load, in
another thread, then each of sharp's kernels is launched once in every specialization a real first
question launches (checked by recording both under Triton's interpreter); load() hands the thread the
model's config before from_pretrained and returns only once the thread is done."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from conftest import triton_interpreted
from sharp_cli import loading
from sharp_cli.models import kernel_warmup

CUDA = SimpleNamespace(type="cuda", index=0)


def test_no_thread_where_no_triton_kernel_runs():
    assert kernel_warmup.start(torch.device("cpu")) is None


def test_the_key_is_computed_once_in_another_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_warmup, "_uses_triton", lambda device: True)
    monkeypatch.setattr(kernel_warmup, "_key_function", lambda: lambda: calls.append(threading.current_thread()))
    warmup = kernel_warmup.start(CUDA)
    kernel_warmup.finish(warmup)
    assert not warmup.thread.is_alive()
    assert calls == [warmup.thread] and warmup.thread is not threading.main_thread()
    assert warmup.launches == 0  # no config handed over (a load that failed first): no kernel warmed


def test_a_failing_warm_up_is_ignored(monkeypatch):
    def broken():
        raise OSError("unreadable libtriton")

    monkeypatch.setattr(kernel_warmup, "_uses_triton", lambda device: True)
    monkeypatch.setattr(kernel_warmup, "_key_function", lambda: broken)
    kernel_warmup.finish(kernel_warmup.start(CUDA))  # no exception, nothing left running


def test_the_installed_triton_has_the_cached_key_function():
    pytest.importorskip("triton")
    key = kernel_warmup._key_function()
    assert callable(key) and hasattr(key, "cache_info")  # lru_cache'd: computed once per process


def test_load_starts_the_warm_up_before_the_weights_and_waits_for_it(tiny_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText

    events = []
    real = AutoModelForImageTextToText.from_pretrained

    def from_pretrained(*args, **kwargs):
        events.append("from_pretrained")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    warmup = SimpleNamespace(shapes=lambda config, dtype: events.append(("shapes", config.model_type, dtype)))
    monkeypatch.setattr(kernel_warmup, "start", lambda device: events.append(("start", device.type)) or warmup)
    monkeypatch.setattr(kernel_warmup, "finish", lambda thread: events.append(("finish", thread)))
    loading.load(str(tiny_dir), device="cpu", quant="none")
    assert events == [("start", "cpu"), ("shapes", "qwen2_5_vl", torch.float32), "from_pretrained",
                      ("finish", warmup)]


def test_the_warm_up_launches_every_specialization_a_first_question_launches():
    """Every kernel launch of a real question (a tiny Qwen2.5-VL and, with SHARP_GEMV_GROUPS=1,
    Qwen3-VL in bf16, vision tower and decode steps through the kernels) is recorded as Triton
    specializes it (argument dtypes and 16-byte alignment, integers as 1 / divisible by 16 / other,
    the constexprs and launch options),
    and so is every launch of warm_kernels on the same config: the question's must be among the
    warm-up's, for each of the kernels. A warm-up that misses a width, a stride or a dtype fails."""
    out = triton_interpreted("""
        import torch
        from conftest import make_clip
        from sharp_cli import loading
        from sharp_cli.answer import ask
        from sharp_cli.models import adapter_for, fused_step, fused_vision, gemv, kernel_warmup
        from sharp_cli.models.random_init import build_random, tiny_config
        from sharp_cli.prune import PruneConfig

        def kind(value):
            if isinstance(value, torch.Tensor):
                return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
            if isinstance(value, bool) or value is None:
                return value
            if isinstance(value, int):
                return ("int", 1 if value == 1 else 16 if value % 16 == 0 else 0)
            return type(value).__name__

        seen = set()

        class Recorded:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.add((self.name, tuple(kind(a) for a in args), tuple(sorted(kwargs.items()))))
                    return self.kernel[grid](*args, **kwargs)
                return launch

        names = ("rms_norm", "rotary", "silu_mul")
        step = tuple(Recorded(n, k) for n, k in zip(names, fused_step._kernels()))
        rotary, product = Recorded("vision_rotary", fused_vision._kernel()), Recorded("gemv", gemv._kernel())
        fused_step._kernels, fused_vision._kernel, gemv._kernel = (lambda: step), (lambda: rotary), (lambda: product)

        import os
        for family, groups in (("qwen2.5-vl", "0"), ("qwen3-vl", "1")):  # the default; and grouped products
            os.environ["SHARP_GEMV_GROUPS"] = groups
            config = tiny_config(family, layers=3)
            if groups == "1":  # gate/up grouped past 4,096 rows: block sizes of their own (gemv.block_sizes)
                config.text_config.intermediate_size = 2560
            model, processor = build_random(config, dtype="bfloat16")
            loaded = loading.ready(loading.Loaded(model, processor, adapter_for(config), "tiny", torch.device("cpu"),
                                                  torch.bfloat16, "none", True))
            seen.clear()
            ask(loaded, make_clip(seed=1), "what colour?", loaded.resolve_prune(PruneConfig(method="none")),
                max_new_tokens=4, max_pixels=56 * 56 * 4)
            question = set(seen)
            seen.clear()
            launches = kernel_warmup.warm_kernels(config, torch.device("cpu"), torch.bfloat16)
            missed = question - seen
            assert not missed, (family, sorted(missed, key=str)[:3])
            kernels = {name for name, *_ in question}
            print(family, sorted(kernels), launches)
        print("ok")
    """, SHARP_FUSED_STEP="1", SHARP_FUSED_VISION="1", SHARP_GEMV="1")
    assert out.strip().endswith("ok")
    families = dict(line.split(" ", 1) for line in out.splitlines()[:2])
    assert all(name in families["qwen2.5-vl"] for name in ("rms_norm", "rotary", "silu_mul", "gemv", "vision_rotary"))


def test_the_kernels_warm_on_the_loading_threads_device(monkeypatch):
    """A device without an index means the caller's current one (a sharded eval's rank sets it): the
    warm-up thread launches there, under that device's context, never on its own default GPU 0."""
    from contextlib import contextmanager

    entered, warmed = [], []

    @contextmanager
    def device_context(index):
        entered.append(index)
        yield

    monkeypatch.setattr(kernel_warmup, "_uses_triton", lambda device: True)
    monkeypatch.setattr(kernel_warmup, "_key_function", lambda: lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device", device_context)
    monkeypatch.setattr(kernel_warmup, "warm_kernels",
                        lambda config, device, dtype: warmed.append((config, device, dtype, list(entered))) or 7)
    warmup = kernel_warmup.start(torch.device("cuda"))
    warmup.shapes("config", torch.bfloat16)
    kernel_warmup.finish(warmup)
    assert warmed == [("config", torch.device("cuda", 3), torch.bfloat16, [3])] and warmup.launches == 7

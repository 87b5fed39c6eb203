"""models/kernel_warmup.py: Triton's per-process key is computed beside the weights' load, in
another thread, and load() returns only once it is done."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sharp_cli import loading
from sharp_cli.models import kernel_warmup

CUDA = SimpleNamespace(type="cuda", index=0)


def test_no_thread_where_no_triton_kernel_runs():
    assert kernel_warmup.start(torch.device("cpu")) is None


def test_the_key_is_computed_once_in_another_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_warmup, "_uses_triton", lambda device: True)
    monkeypatch.setattr(kernel_warmup, "_key_function", lambda: lambda: calls.append(threading.current_thread()))
    thread = kernel_warmup.start(CUDA)
    kernel_warmup.finish(thread)
    assert not thread.is_alive()
    assert calls == [thread] and thread is not threading.main_thread()


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
    monkeypatch.setattr(kernel_warmup, "start", lambda device: events.append(("start", device.type)) or "thread")
    monkeypatch.setattr(kernel_warmup, "finish", lambda thread: events.append(("finish", thread)))
    loading.load(str(tiny_dir), device="cpu", quant="none")
    assert events == [("start", "cpu"), "from_pretrained", ("finish", "thread")]

"""`sharp serve --max-batch N`: concurrent requests decoded together (scheduler.py) answer as one
at a time, stream, stop alone when their client leaves, and fail alone."""

from __future__ import annotations

import threading

import httpx
import pytest

from serving import SMALL_PIXELS, LiveServer, body
from test_serve_queue import in_thread, wait_for


class GatedBegin:
    """answer.begin (the scheduler's first step for a request) that waits for `gate` the first time,
    so that the requests sent meanwhile queue up and then join one running batch."""

    def __init__(self, monkeypatch):
        from sharp_cli import answer

        self.real, self.gate, self.calls = answer.begin, threading.Event(), 0
        monkeypatch.setattr(answer, "begin", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        assert self.gate.wait(60)
        return self.real(*args, **kwargs)


def direct(loaded, path, max_new_tokens, method="sharp", ratio=0.25):
    from sharp_cli import answer
    from sharp_cli.prune.config import PruneConfig
    from sharp_cli.video import load_video

    clip = load_video(path, frames=8, max_pixels=SMALL_PIXELS)
    cfg = loaded.resolve_prune(PruneConfig(method=method, ratio=ratio, layer=2))
    return answer.ask(loaded, clip, "what colour is the ball?", cfg, max_new_tokens=max_new_tokens,
                      max_pixels=SMALL_PIXELS)


def test_concurrent_requests_share_decode_steps_and_answer_as_one_at_a_time(loaded, media, monkeypatch):
    gated = GatedBegin(monkeypatch)
    asks = [("clip one.mp4", {"max_tokens": 8}), ("wide.mp4", {"max_tokens": 6, "method": "none"}),
            ("tall.mp4", {"max_tokens": 8, "ratio": 0.5}), ("clip one.mp4", {"max_tokens": 7, "stream": True})]
    with LiveServer(loaded, media, max_batch=4) as live:
        worker = live.service.worker
        first = in_thread(live.post, body(url=asks[0][0], **asks[0][1]))
        wait_for(lambda: gated.calls == 1, what="the first request to reach the model")
        rest = [in_thread(live.post, body(url=url, **fields)) for url, fields in asks[1:]]
        wait_for(lambda: worker.waiting == 3, what="the others to queue")
        gated.gate.set()
        replies = [first.get(timeout=120), *(r.get(timeout=120) for r in rest)]
        health = httpx.get(live.url + "/health").json()
    assert all(r.status_code == 200 for r in replies)
    records = [r.json()["sharp"] for r in replies[:3]]
    streamed = [line[6:] for line in replies[3].text.splitlines() if line.startswith("data: {")]
    import json

    chunks = [json.loads(line) for line in streamed]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    records.append(next(c["sharp"] for c in chunks if c.get("sharp")))
    for (url, fields), record in zip(asks, records):
        alone = direct(loaded, media / url, fields["max_tokens"], fields.get("method", "sharp"),
                       fields.get("ratio", 0.25))
        assert record["answer"] == alone.text and record["new_tokens"] == len(alone.tokens), url
        assert record["decode_mode"].startswith("batched")
    assert text == records[3]["answer"] and len([c for c in chunks if c["choices"] and
                                                 c["choices"][0]["delta"].get("content")]) > 1
    assert max(r["decode_batch"] for r in records) >= 3  # they shared steps
    assert health["answered"] == 4 and health["running"] == 0 and health["waiting"] == 0


def test_a_client_that_leaves_mid_answer_stops_only_its_own_answer(loaded, media, monkeypatch):
    from sharp_cli.serve.service import Work

    lengths, real_result = {}, Work.result

    def result(self, answer):
        lengths[self.question.source.label.rsplit("/", 1)[-1]] = len(answer.tokens)
        return real_result(self, answer)

    monkeypatch.setattr(Work, "result", result)
    with LiveServer(loaded, media, max_batch=4) as live:
        with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60,
                          json=body(url="wide.mp4", max_tokens=400, stream=True)) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""  # the role chunk
            other = live.post(body(url="tall.mp4", max_tokens=6))
        wait_for(lambda: live.service.worker.stats["cancelled"] == 1, what="the cancel to be counted")
        assert other.status_code == 200
        assert other.json()["sharp"]["answer"] == direct(loaded, media / "tall.mp4", 6).text
        assert lengths["wide.mp4"] < 100 and live.post(body(max_tokens=1)).status_code == 200


def test_out_of_memory_fails_one_request_and_the_batch_goes_on(loaded, media, monkeypatch):
    import torch

    from sharp_cli import answer

    real = answer.begin

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(answer, "begin", real)  # once
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(answer, "begin", out_of_memory)
    with LiveServer(loaded, media, max_batch=2) as live:
        response = live.post(body())
        assert response.status_code == 500 and response.json()["error"]["code"] == "out_of_memory"
        assert live.post(body(max_tokens=2)).status_code == 200


def test_the_queue_holds_max_queue_besides_the_answers_in_flight(loaded, media, monkeypatch):
    gated = GatedBegin(monkeypatch)
    with LiveServer(loaded, media, max_batch=2, max_queue=0) as live:
        worker = live.service.worker
        first = in_thread(live.post, body(max_tokens=2))
        wait_for(lambda: gated.calls == 1, what="the first request to reach the model")
        second = in_thread(live.post, body(url="wide.mp4", max_tokens=2))
        wait_for(lambda: worker.waiting == 1, what="the second request to queue")
        refused = live.post(body())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        gated.gate.set()
        assert first.get(timeout=60).status_code == 200 and second.get(timeout=60).status_code == 200


@pytest.mark.parametrize("args, message", [(["--max-batch", "0"], "--max-batch must be >= 1"),
                                           (["--kv-gb", "0"], "--kv-gb must be > 0")])
def test_serve_refuses_bad_batch_options_before_loading(tiny_dir, args, message):
    from typer.testing import CliRunner

    from sharp_cli.cli import app

    result = CliRunner().invoke(app, ["serve", "-m", str(tiny_dir), *args])
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("max_batch", [1, 4])
def test_the_processor_works_in_the_decoding_thread_not_the_models(loaded, media, monkeypatch, max_batch):
    # Its CPU work on the frames, done by the model's thread, would stall every answer in flight.
    from sharp_cli.prior_pass import PRIOR_QUESTION

    adapter, threads = type(loaded.adapter), []
    real = adapter.processor_inputs

    def spy(self, processor, prompt, *args, **kwargs):
        if PRIOR_QUESTION not in str(prompt):  # the positional prior's black clip: the model's own pass
            threads.append(threading.current_thread().name)
        return real(self, processor, prompt, *args, **kwargs)

    monkeypatch.setattr(adapter, "processor_inputs", spy)
    with LiveServer(loaded, media, max_batch=max_batch) as live:
        reply = live.post(body(url="wide.mp4", max_tokens=3))
    assert reply.status_code == 200, reply.text
    assert threads and "sharp-model" not in threads, threads

"""`sharp batch --max-batch N`: items decoded together give the one-at-a-time run's lines, in
input order, error lines included, and an interrupted run resumes the same way."""

from __future__ import annotations

from test_batch import SMALL, folder, lines, sharp, write_items  # noqa: F401  (folder: a fixture)


def test_items_answered_together_give_the_one_at_a_time_lines_in_order(model_dirs, folder, tmp_path):  # noqa: F811
    model = model_dirs["qwen2.5-vl"]
    items = write_items(tmp_path / "items.jsonl", [
        {"id": "first", "video": "a.mp4", "question": "what colour is the ball?"},
        "{this is not json",
        {"id": "none", "video": "b.mp4", "question": "how many?", "method": "none", "max_tokens": 5},
        {"id": "gone", "video": "missing.mp4", "question": "what?"},
        {"id": "half", "video": "a.mp4", "question": "where?", "ratio": 0.5, "frames": 4},
        {"id": 70, "video": "b.mp4", "question": "what?", "ratio": 2},
        {"id": "one", "video": "b.mp4", "question": "what now?", "max_tokens": 1},
        {"id": "last", "video": "a.mp4", "question": "what colour is the ball?", "max_tokens": 6},
    ])
    alone = sharp("batch", items, "-m", model, *SMALL, "--video-dir", folder, "--max-batch", "1")
    together = sharp("batch", items, "-m", model, *SMALL, "--video-dir", folder, "--max-batch", "3")
    assert alone.exit_code == together.exit_code == 1, together.stderr
    one, many = lines(alone.stdout), lines(together.stdout)
    assert [r["id"] for r in many] == [r["id"] for r in one] == ["first", 2, "none", "gone", "half", 70, "one", "last"]
    for a, b in zip(one, many):
        assert a.get("error") == b.get("error") and a.get("answer") == b.get("answer"), a["id"]
        assert a.get("new_tokens") == b.get("new_tokens") and a.get("visual_tokens_kept") == b.get("visual_tokens_kept")
    answered = [r for r in many if "answer" in r]
    assert max(r["decode_batch"] for r in answered) > 1 and all(r["decode_mode"].startswith("batched")
                                                                 for r in answered)
    assert all(r["decode_batch"] == 1 for r in one if "answer" in r)
    assert "5 answered, 3 failed" in together.stderr
    said = [line.split("] ", 1)[1].split(":")[0] for line in together.stderr.splitlines() if "] " in line]
    assert said == ["first", "2", "none", "gone", "half", "70", "one", "last"]  # progress in input order too


def test_an_interrupted_batched_run_resumes(model_dirs, folder, tmp_path, monkeypatch):  # noqa: F811
    from sharp_cli import answer

    items = write_items(tmp_path / "items.jsonl", [
        {"id": n, "video": "ab"[n % 2] + ".mp4", "question": f"question {n}?"} for n in range(5)])
    out = tmp_path / "out.jsonl"
    model = model_dirs["qwen2.5-vl"]
    real, calls = answer.begin, []

    def interrupted(*args, **kwargs):  # Ctrl-C as the third item starts, the first two in flight or done
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(answer, "begin", interrupted)
    first = sharp("batch", items, "-m", model, *SMALL, "-o", out, "--video-dir", folder, "--max-batch", "2")
    assert first.exit_code == 130 and "interrupted" in first.stderr, first.stderr
    written = [r["id"] for r in lines(out.read_text())]
    assert written in ([0], [0, 1])  # in input order: what ended before the interruption
    with open(out, "a") as handle:
        handle.write('{"id": 2, "answer": "half')
    monkeypatch.setattr(answer, "begin", real)
    second = sharp("batch", items, "-m", model, *SMALL, "-o", out, "--video-dir", folder, "--max-batch", "2")
    assert second.exit_code == 0, second.stderr
    records = lines(out.read_text())
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4] and all("answer" in r for r in records)
    assert f"{5 - len(written)} answered, 0 failed, {len(written)} answered in" in second.stderr


def test_bad_batch_options_are_usage_errors(model_dirs, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [{"video": "a.mp4", "question": "what?"}])
    for args, message in ((["--max-batch", "0"], "--max-batch must be >= 1"),
                          (["--kv-gb", "-1"], "--kv-gb must be > 0")):
        result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *args)
        assert result.exit_code == 2 and message in result.stderr


def test_the_processor_works_ahead_in_the_prefetch_threads(model_dirs, folder, tmp_path, monkeypatch):  # noqa: F811
    # The frames' resize/normalise/patchify is CPU work; done in the model's thread it stalls the GPU
    # between requests. Batched, every video's is done by a prefetch thread (answers: the test above).
    import threading
    import time

    from sharp_cli.models.qwen import QwenVLAdapter
    from sharp_cli.prior_pass import PRIOR_QUESTION

    threads = []
    real = QwenVLAdapter.processor_inputs

    def spy(self, processor, prompt, *args, **kwargs):
        if PRIOR_QUESTION not in str(prompt):  # the positional prior's black clip: the model's own pass
            threads.append(threading.current_thread().name)
            time.sleep(0.05)  # a processor this slow must show in the answers' prepare_seconds
        return real(self, processor, prompt, *args, **kwargs)

    monkeypatch.setattr(QwenVLAdapter, "processor_inputs", spy)
    items = write_items(tmp_path / "items.jsonl", [
        {"id": i, "video": video, "question": "what colour is the ball?", "max_tokens": 2}
        for i, video in enumerate(["a.mp4", "b.mp4", "a.mp4", "b.mp4"])])
    result = sharp("batch", items, "-m", model_dirs["qwen2.5-vl"], *SMALL, "--video-dir", folder, "--max-batch", "2")
    assert result.exit_code == 0, result.stderr
    records = lines(result.stdout)
    assert len(records) == 4
    # The time it took is still reported, with the answer whose frames it processed.
    assert max(r["prepare_seconds"] for r in records) >= 0.05
    # Each video's frames once (a repeat finds its vision output cached and needs only the prompt's
    # layout), every time in a prefetch thread.
    assert len(threads) >= 2 and all(name.startswith("sharp-prefetch") for name in threads), threads

"""`sharp serve` through the official openai client (and raw HTTP where a client would not send it),
against live servers on free ports with a tiny model on the CPU."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving import SMALL_PIXELS, LiveServer, body, video_message
from videos import make_video

ASK_KEYS = {"answer", "model", "method", "ratio", "layer", "frames", "video", "sequence_tokens", "visual_tokens_total",
            "visual_tokens_kept", "prefill_seconds", "decode_seconds", "new_tokens", "kv_cache_bytes", "device",
            "quant", "options"}


@pytest.fixture(scope="module")
def server(loaded, media):
    with LiveServer(loaded, media) as live:
        yield live


def direct_answer(loaded, path, question, max_new_tokens=4, method="sharp", ratio=0.25):
    """What sharp_cli.answer.ask says for the same input, outside the server."""
    from sharp_cli import answer
    from sharp_cli.prune.config import PruneConfig
    from sharp_cli.video import load_video

    clip = load_video(path, frames=8, max_pixels=SMALL_PIXELS)
    return answer.ask(loaded, clip, question, loaded.resolve_prune(PruneConfig(method=method, ratio=ratio, layer=2)),
                      max_new_tokens=max_new_tokens, max_pixels=SMALL_PIXELS).text


# -- answers ---------------------------------------------------------------------------------------
def test_plain_answer_is_a_chat_completion_with_usage_and_the_sharp_record(server, loaded, media):
    reply = server.client().chat.completions.create(model="tiny-served", messages=video_message("clip one.mp4"),
                                                    max_tokens=4)
    assert reply.object == "chat.completion" and reply.model == "tiny-served"
    text = reply.choices[0].message.content
    assert text and text == direct_answer(loaded, media / "clip one.mp4", "what colour is the ball?")
    sharp = reply.model_extra["sharp"]
    assert ASK_KEYS <= set(sharp) and sharp["answer"] == text and sharp["video"] == str(media / "clip one.mp4")
    assert reply.usage.prompt_tokens == sharp["sequence_tokens"]
    assert reply.usage.completion_tokens == sharp["new_tokens"] <= 4
    assert reply.choices[0].finish_reason == ("length" if sharp["new_tokens"] == 4 else "stop")


def test_streamed_chunks_join_to_the_plain_answer(server):
    client = server.client()
    plain = client.chat.completions.create(model="tiny-served", messages=video_message("wide.mp4"), max_tokens=6)
    chunks = list(client.chat.completions.create(model="tiny-served", messages=video_message("wide.mp4"),
                                                 max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one piece
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["sharp"]["answer"] == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body(stream=True, max_tokens=2),
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"


def test_extra_body_options_reach_the_method(server):
    client = server.client()

    def sharp_record(**extra):
        reply = client.chat.completions.create(model="tiny-served", messages=video_message("tall.mp4"),
                                               max_tokens=1, extra_body=extra)
        return reply.model_extra["sharp"]

    full, pruned = sharp_record(method="none"), sharp_record(method="sharp", ratio=0.5, layer=3)
    assert full["method"] == "none" and full["visual_tokens_kept"] == full["visual_tokens_total"]
    assert pruned["method"] == "sharp" and pruned["layer"] == 3
    assert pruned["visual_tokens_kept"] == int(0.5 * pruned["visual_tokens_total"] + 0.5)
    fewer = sharp_record(frames=4, max_pixels=56 * 56)
    assert fewer["frames"] == 4 and fewer["visual_tokens_total"] < full["visual_tokens_total"]
    assert sharp_record(fps=2)["frames"] == 8  # 4 s at 2 frames a second


def test_concurrent_requests_each_get_their_own_answer(server, loaded, media, monkeypatch):
    from sharp_cli import answer

    questions = [(v, q) for v in ("clip one.mp4", "wide.mp4", "tall.mp4", "clip one.mp4")
                 for q in ("what colour is the ball?", "how many people are there in this clip?")]
    client = server.client()

    def ask(item):
        reply = client.chat.completions.create(model="tiny-served", messages=video_message(*item), max_tokens=3)
        return reply.choices[0].message.content, reply.model_extra["sharp"]

    sequential = [ask(item) for item in questions]
    running, most = [0], [0]
    real_ask = answer.ask

    def counting_ask(*args, **kwargs):  # the model is called by one thread at a time, never two at once
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            return real_ask(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(answer, "ask", counting_ask)
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, questions))
    assert most[0] == 1
    for (video, question), (text, record), (alone, alone_record) in zip(questions, concurrent, sequential):
        assert text == alone and record["video"] == str(media / video)
        assert record["sequence_tokens"] == alone_record["sequence_tokens"]
    assert len({(r["video"], r["sequence_tokens"]) for _, r in concurrent}) > 4  # the inputs really differ


# -- bad requests ----------------------------------------------------------------------------------
BAD = [
    ("not json", b"{not json", 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("no messages", {"model": "tiny-served"}, 400, "invalid_value"),
    ("messages not a list", {"messages": "hello"}, 400, "invalid_value"),
    ("unknown field", body(ratoi=0.5), 400, "invalid_value"),
    ("no video part", {"messages": [{"role": "user", "content": "what happens?"}]}, 400, "no_video"),
    ("two videos", {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "wide.mp4"}},
        {"type": "video_url", "video_url": {"url": "tall.mp4"}},
        {"type": "text", "text": "which is longer?"}]}]}, 400, "too_many_videos"),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "what?"}]}]},
     400, "unsupported_content"),
    ("empty question", body(question="  "), 400, "empty_question"),
    ("system prompt", {"messages": [{"role": "system", "content": "be brief"}, *video_message("wide.mp4")]},
     400, "invalid_messages"),
    ("missing file", body(url="nowhere.mp4"), 400, "invalid_video"),
    ("undecodable file", body(url="not a video.mp4"), 400, "invalid_video"),
    ("ratio out of range", body(ratio=0), 400, "invalid_value"),
    ("ratio not a number", body(ratio="lots"), 400, "invalid_value"),
    ("layer too deep", body(layer=9), 400, "invalid_value"),
    ("unknown method", body(method="magic"), 400, "invalid_value"),
    ("zero frames", body(frames=0), 400, "invalid_value"),
    ("negative fps", body(fps=-1), 400, "invalid_value"),
    ("zero max_tokens", body(max_tokens=0), 400, "invalid_value"),
    ("bad top_p", body(top_p=0), 400, "invalid_value"),
    ("n > 1", body(n=2), 400, "unsupported_parameter"),
    ("http url", body(url="https://example.com/clip.mp4"), 400, "unsupported_url"),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("nested inside the request", body() | {"user": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}, 200, None),
    ("seed beyond 64 bits", body(seed=2**70), 400, "invalid_value"),
    ("temperature infinity", body(temperature=float("inf")), 400, "invalid_value"),
    ("max_pixels beyond any frame", body(max_pixels=10**15), 400, "invalid_value"),
    ("unknown model", body() | {"model": "gpt-4o"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("payload, status, code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, payload, status, code):
    response = server.post(payload, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status == 200:
        return
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    assert server.post(body(max_tokens=1)).status_code == 200


def test_seed_and_max_pixels_bounds_are_named(server):
    assert server.post(body(seed=2**70)).json()["error"]["message"] == \
        f"seed must be in [0, 2**64 - 1], got {2**70}"
    assert server.post(body(max_pixels=10**15)).json()["error"]["message"] == \
        "max_pixels must be in [1, 16,777,216] (a 4096x4096 frame), got 1,000,000,000,000,000"
    assert server.post(b"[" * 100_000 + b"]" * 100_000).json()["error"]["message"] == \
        "the request body is nested too deeply"


NUMBERS = ("ratio", "layer", "frames", "fps", "max_pixels", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed")


def test_true_or_false_is_not_a_number(server):
    """pydantic reads true as 1: `"frames": true` was 1 frame and a 200 (and "1" was 1). Every number of
    the request refuses both, and the standard fields checked for their neutral value (`"n": true` is not `"n": 1`)."""
    from sharp_cli.overrides import _is_number
    from sharp_cli.serve.schema import ChatRequest

    assert {name for name, f in ChatRequest.model_fields.items() if _is_number(f.annotation)} == set(NUMBERS)
    for name in NUMBERS:
        for value, said in ((True, "true"), (False, "false"), ("1", "a string")):
            response = server.post(body(**{name: value}))
            assert response.status_code == 400, (name, response.text)
            assert response.json()["error"]["code"] == "invalid_value"
            assert response.json()["error"]["message"] == f"{name}: expected a number, got {said}"
    for name, value in (("n", True), ("presence_penalty", False), ("frequency_penalty", False),
                        ("top_logprobs", False)):
        response = server.post(body(**{name: value}))
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_parameter", name
    assert server.post(body(n=1, presence_penalty=0, logprobs=False, frames=2, max_tokens=1)).status_code == 200


def test_a_large_video_is_decoded_at_the_models_pixel_budget(loaded, tmp_path, monkeypatch):
    """Without --max-pixels, 1080p frames become 560x1008 while decoding (what Qwen2.5-VL's processor
    keeps of them), not 1920x1080; the answer's grid is the reference's."""
    from sharp_cli import video as video_mod

    make_video(tmp_path / "hd.mp4", n_frames=8, fps=8, size=(1920, 1080))
    shapes, real = [], video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: shapes.append(real(*a, **k).frames.shape)
                        or real(*a, **k))
    with LiveServer(loaded, tmp_path, max_pixels=None) as live:
        reply = live.post(body(url="hd.mp4", frames=2, max_tokens=1, method="none"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["sharp"]["token_grid"] == [1, 20, 36]
    assert shapes and all(shape[1:3] == (560, 1008) for shape in shapes)


def test_a_request_over_the_models_context_is_a_400_before_decoding(server, loaded, monkeypatch):
    from sharp_cli import video as video_mod

    monkeypatch.setattr(loaded.model.config.text_config, "max_position_embeddings", 200)
    decoded, real = [], video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda *a, **k: decoded.append(1) or real(*a, **k))
    response = server.post(body(frames=24))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_value"
    message = response.json()["error"]["message"]
    assert "over the model's 200-token context (max_position_embeddings)" in message
    assert "lower frames (or fps / max_frames) or max_pixels" in message and not decoded
    assert server.post(body(frames=2, max_tokens=1)).status_code == 200


def test_option_errors_name_the_field_not_the_flag(server):
    assert server.post(body(ratio=0)).json()["error"]["message"] == "ratio must be in (0, 1], got 0.0"
    assert server.post(body(ratoi=1)).json()["error"]["message"] == "ratoi: unknown field"
    assert server.post(body(max_pixels=0)).json()["error"]["message"] == \
        "max_pixels must be in [1, 16,777,216] (a 4096x4096 frame), got 0"
    assert server.post(body(layer=7)).json()["error"]["message"].startswith("layer must be < 4")


def test_openai_client_sees_the_error_codes(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=video_message("wide.mp4"))
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny-served", messages=video_message("wide.mp4"), extra_body={"ratio": 3})
    assert bad.value.code == "invalid_value" and "ratio" in bad.value.message


def test_unknown_routes_and_methods_get_the_error_shape(server):
    missing = httpx.get(server.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_models_health_and_model_names(loaded, media):
    with LiveServer(loaded, media, model_ids=("tiny-served", "/models/qwen-tiny", "qwen-tiny")) as live:
        client = live.client()
        assert [m.id for m in client.models.list()] == ["tiny-served"]
        assert client.models.retrieve("qwen-tiny").id == "tiny-served"
        health = httpx.get(live.url + "/health").json()
        assert health["status"] == "ok" and health["model"] == "tiny-served"
        for name in ("qwen-tiny", "/models/qwen-tiny"):
            assert live.post(body(max_tokens=1) | {"model": name}).status_code == 200
        without = body(max_tokens=1)
        del without["model"]
        assert live.post(without).status_code == 200


def test_model_names_a_request_may_use():
    from sharp_cli.serve.command import model_ids

    assert model_ids("/data/models/qwen-tiny/", None) == ("/data/models/qwen-tiny/", "qwen-tiny")
    assert model_ids("Qwen/Qwen2.5-VL-7B-Instruct", "qwen") == ("qwen", "Qwen/Qwen2.5-VL-7B-Instruct",
                                                                "Qwen2.5-VL-7B-Instruct")


# -- security ----------------------------------------------------------------------------------------
def test_api_key_is_required_on_every_route_but_liveness(loaded, media):
    with LiveServer(loaded, media, api_key="s3cret") as live:
        for response in (live.post(body(max_tokens=1)), httpx.get(live.url + "/v1/models"),
                         httpx.get(live.url + "/nothing"), httpx.post(live.url + "/health"),
                         httpx.get(live.url + "/health/", headers={"Authorization": "Bearer guess"})):
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        for key in (None, "guess"):  # a load balancer's probe: alive or not, nothing more
            probe = httpx.get(live.url + "/health", headers={"Authorization": f"Bearer {key}"} if key else {})
            assert probe.status_code == 200 and probe.json() == {"status": "ok"}
        details = httpx.get(live.url + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert details["model"] == "tiny-served" and {"busy", "waiting", "answered", "failed"} <= set(details)
        wrong = live.post(body(max_tokens=1), headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="guess").chat.completions.create(model="tiny-served",
                                                                 messages=video_message("wide.mp4"))
        reply = live.client(api_key="s3cret").chat.completions.create(
            model="tiny-served", messages=video_message("wide.mp4"), max_tokens=1)
        assert reply.choices[0].message.content is not None


def test_media_dir_confines_local_files(server, media, tmp_path):
    outside = make_video(tmp_path / "secret.mp4", n_frames=8, fps=8, size=(56, 56))
    escape = media / "escape.mp4"
    inside_link = media / "alias.mp4"
    if not escape.exists():
        escape.symlink_to(outside)
    if not inside_link.exists():
        inside_link.symlink_to(media / "wide.mp4")
    relative_up = os.path.relpath(outside, media)
    refused = [relative_up, f"sub/../{relative_up}", str(outside), f"file://{outside}", "escape.mp4",
               f"file://{media}/../{os.path.basename(tmp_path)}/secret.mp4"]
    for url in refused:
        response = server.post(body(url=url, max_tokens=1))
        assert response.status_code == 403, url
        assert response.json()["error"]["code"] == "outside_media_dir"
    allowed = ["alias.mp4", f"file://{media}/clip%20one.mp4", str(media / "clip one.mp4"), "file://localhost"
               + str(media / "wide.mp4")]
    for url in allowed:
        assert server.post(body(url=url, max_tokens=1)).status_code == 200, url
    assert server.post(body(url="file://elsewhere/clip.mp4")).json()["error"]["code"] == "invalid_video_url"


def test_a_sibling_folder_that_shares_the_media_folders_name_is_outside(loaded, tmp_path):
    """<media>-x/ starts with <media> as a string but is not under it (a string-prefix check would let
    it through): 403."""
    media = tmp_path / "media"
    sibling = tmp_path / "media-x"
    for folder in (media, sibling):
        folder.mkdir()
        make_video(folder / "clip.mp4", n_frames=8, fps=8, size=(56, 56))
    with LiveServer(loaded, media) as live:
        for url in (str(sibling / "clip.mp4"), "../media-x/clip.mp4", f"file://{sibling}/clip.mp4"):
            response = live.post(body(url=url, max_tokens=1))
            assert response.status_code == 403 and response.json()["error"]["code"] == "outside_media_dir", url
        assert live.post(body(url="clip.mp4", max_tokens=1)).status_code == 200


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_read(loaded, tmp_path, monkeypatch):
    """The path passes the check when the request arrives; before its frames are decoded it becomes
    a symlink to a video outside the media folder. The file opened for decoding is checked: 403,
    and the outside video is never decoded."""
    from sharp_cli import video as video_mod
    from sharp_cli.serve.service import Service

    media, outside = tmp_path / "media", tmp_path / "private"
    media.mkdir()
    outside.mkdir()
    make_video(media / "swap.mp4", n_frames=8, fps=8, size=(56, 56))
    secret = make_video(outside / "secret.mp4", n_frames=8, fps=8, size=(112, 84))
    real_decode, decoded = Service.decode, []

    def swap_then_decode(self, question):
        os.replace(media / "swap.mp4", media / "was-swap.mp4")
        os.symlink(secret, media / "swap.mp4")
        return real_decode(self, question)

    real_load = video_mod.load_video
    monkeypatch.setattr(video_mod, "load_video", lambda path, **k: decoded.append(os.path.realpath(path))
                        or real_load(path, **k))
    monkeypatch.setattr(Service, "decode", swap_then_decode)
    with LiveServer(loaded, media) as live:
        response = live.post(body(url="swap.mp4", max_tokens=1))
        assert response.status_code == 403 and response.json()["error"]["code"] == "outside_media_dir"
        assert secret not in decoded
        os.unlink(media / "swap.mp4")
        os.replace(media / "was-swap.mp4", media / "swap.mp4")
        monkeypatch.setattr(Service, "decode", real_decode)
        assert live.post(body(url="swap.mp4", max_tokens=1)).status_code == 200  # read through the opened file
        assert decoded[-1] == str(media / "swap.mp4")


def test_uploads_are_bounded_and_their_files_removed(loaded, media):
    data = (media / "wide.mp4").read_bytes()
    upload = "data:video/mp4;base64," + base64.b64encode(data).decode()
    with LiveServer(loaded, media, max_upload_mb=len(data) * 2 / 1e6) as live:
        sent = live.post(body(url=upload, max_tokens=3))
        by_path = live.post(body(url="wide.mp4", max_tokens=3))
        assert sent.status_code == 200 and sent.json()["choices"][0]["message"]["content"] == \
            by_path.json()["choices"][0]["message"]["content"]
        assert sent.json()["sharp"]["video"].startswith("upload (video/mp4")
        assert os.listdir(live.service.upload_dir) == []  # the temporary file is gone

        big = "data:video/mp4;base64," + base64.b64encode(data * 3).decode()
        too_big = live.post(body(url=big))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "upload_too_large"
        huge = live.post(b'{"messages": "' + b"x" * live.service.settings.media.max_body_bytes + b'"}')
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        for url, code in (("data:video/mp4;base64,@@@@", "invalid_video_url"),
                          ("data:text/plain;base64,aGVsbG8=", "invalid_video_url"),
                          ("data:video/mp4;base64," + base64.b64encode(b"not a video").decode(), "invalid_video")):
            bad = live.post(body(url=url))
            assert bad.status_code == 400 and bad.json()["error"]["code"] == code, url
            assert live.service.upload_dir.name not in bad.text  # the client's upload, not our temp path
        assert os.listdir(live.service.upload_dir) == []
        assert live.post(body(max_tokens=1)).status_code == 200
    assert not live.service.upload_dir.exists()

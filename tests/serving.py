"""A live `sharp serve` app for the tests: uvicorn in a thread over an already loaded model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai

SMALL_PIXELS = 56 * 56 * 4


class LiveServer:
    """The app `sharp serve` runs, on uvicorn in a thread, over an already loaded model."""

    def __init__(self, loaded, media_dir, *, model_ids=("tiny-served",), api_key=None, max_queue=32,
                 max_upload_mb=1.0, max_new_tokens=4, max_pixels=SMALL_PIXELS, **extra):
        from sharp_cli.overrides import Defaults
        from sharp_cli.prune.config import PruneConfig
        from sharp_cli.serve.command import bind, build_app, make_server
        from sharp_cli.serve.media import MediaPolicy
        from sharp_cli.serve.service import Service, Settings

        cfg = PruneConfig(ratio=0.25, debias="subtract").validate()
        video = dict(frames=8, fps=None, max_frames=768, max_pixels=max_pixels, backend="auto")
        settings = Settings(model_ids=tuple(model_ids), api_key=api_key, max_queue=max_queue,
                            defaults=Defaults(loaded.resolve_prune(cfg), video, max_new_tokens),
                            media=MediaPolicy.create(media_dir, max_upload_mb), **extra)
        self.service = Service(loaded, settings)
        self.server = make_server(build_app(self.service), quiet=True)
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, api_key="unused", **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def post(self, body, **kwargs):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + "/v1/chat/completions", content=content, timeout=120, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def video_message(url, question="what colour is the ball?"):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def body(url="clip one.mp4", question="what colour is the ball?", **fields):
    return {"model": "tiny-served", "messages": video_message(url, question), **fields}

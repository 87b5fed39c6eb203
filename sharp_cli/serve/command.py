"""`sharp serve`: one loaded model behind an OpenAI-compatible HTTP API (docs/serve.md).

The command and the runner: it loads the model, binds the socket, and runs uvicorn over app.py's
routes with the worker started and drained alongside (the split of vLLM's server: schema.py the
protocol, service.py the serving, app.py the routes). sharp_cli/cli.py registers the command;
nothing heavy is imported until it runs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Annotated, Optional

import typer

from sharp_cli.errors import SharpError
from sharp_cli.options import (
    DEFAULT_MODEL,
    CacheGb,
    Compile,
    CudaGraphs,
    Decoder,
    Device,
    Dtype,
    Fps,
    Frames,
    KvGb,
    MaxBatch,
    MaxFrames,
    MaxPixels,
    Model,
    NoPriorCache,
    Quant,
    RandomWeights,
    TrustRemoteCode,
    prune_options,
)
from sharp_cli.prune.config import PruneConfig

Host = Annotated[str, typer.Option(
    help="Address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every interface.")]
Port = Annotated[int, typer.Option(help="TCP port (0: any free one; the address is printed).")]
ApiKey = Annotated[Optional[str], typer.Option(
    envvar="SHARP_API_KEY", show_default=False,
    help="Refuse (401) every request without 'Authorization: Bearer <key>'.")]
MediaDir = Annotated[str, typer.Option(help="file:// URLs and paths are read only under this folder (403 outside it).")]
MaxUploadMb = Annotated[float, typer.Option(
    help="Largest data: URL video a request may carry, in MB (413 beyond; 0: no uploads).")]
MaxQueue = Annotated[int, typer.Option(
    help="Requests waiting for the model besides the one it is answering (503 beyond).")]
ServedName = Annotated[Optional[str], typer.Option(
    help="The model id /v1/models lists and requests name (default: -m as given).")]
MaxNewTokens = Annotated[int, typer.Option(help="Answer tokens when a request gives no max_tokens.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No access log; warnings and errors only.")]


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn once it has shut down gracefully."""


@prune_options()
def serve_command(
    model: Model = DEFAULT_MODEL,
    device: Device = "auto", quant: Quant = "auto", dtype: Dtype = "auto",
    random_weights: RandomWeights = False, trust_remote_code: TrustRemoteCode = False,
    host: Host = "127.0.0.1", port: Port = 8000, api_key: ApiKey = None, media_dir: MediaDir = ".",
    max_upload_mb: MaxUploadMb = 100.0, max_queue: MaxQueue = 32, served_model_name: ServedName = None,
    frames: Frames = 32, fps: Fps = None, max_frames: MaxFrames = 768, max_pixels: MaxPixels = None,
    decoder: Decoder = "auto",
    prune: PruneConfig = PruneConfig(),
    max_new_tokens: MaxNewTokens = 128, no_prior_cache: NoPriorCache = False, cuda_graphs: CudaGraphs = True,
    compile_model: Compile = False,
    cache_gb: CacheGb = 4.0, max_batch: MaxBatch = None, kv_gb: KvGb = None, quiet: Quiet = False,
):
    """Serve one model over HTTP in OpenAI's chat-completions format (video_url parts, streaming).

    The pruning and frame options set the defaults; a request may change method, ratio, layer,
    frames, fps, max_pixels, max_tokens, temperature, top_p, top_k and seed (extra_body in the openai
    client). See docs/serve.md.
    """
    from sharp_cli.errors import UsageError
    from sharp_cli.options import check_kv_gb, max_batch_for
    from sharp_cli.overrides import MAX_TOKENS_LIMIT, Defaults

    cfg = prune.validate()
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {port}")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {max_queue}")
    if not max_upload_mb >= 0:
        raise UsageError(f"--max-upload-mb must be >= 0, got {max_upload_mb}")
    if not 1 <= max_new_tokens <= MAX_TOKENS_LIMIT:
        raise UsageError(f"--max-new-tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_new_tokens}")
    if frames < 1 or (fps is not None and not fps > 0) or max_frames < 1 or (max_pixels is not None and max_pixels < 1):
        raise UsageError("--frames, --max-frames and --max-pixels must be >= 1, --fps > 0")
    if not os.path.isdir(media_dir):
        raise UsageError(f"--media-dir is not a folder: {media_dir}")
    if not cache_gb >= 0:
        raise UsageError(f"--cache-gb must be >= 0, got {cache_gb}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key (or SHARP_API_KEY) is empty; give a key or leave it out")
    check_kv_gb(kv_gb)
    if max_batch is not None:
        max_batch_for(max_batch, device)

    from sharp_cli import model_files

    cfg = model_files.check_layer(model, cfg, random_weights)  # K resolved and checked, before torch loads
    sock = bind(host, port)  # a port in use fails now, not after the model has loaded
    try:
        loaded, cfg = load_model(model, cfg, device, quant, dtype, random_weights, trust_remote_code, cuda_graphs,
                                 quiet, compile_model)
        from sharp_cli.serve.media import MediaPolicy
        from sharp_cli.serve.service import Settings

        batch = max_batch_for(max_batch, loaded.device.type)

        video = dict(frames=frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels, backend=decoder)
        settings = Settings(
            model_ids=model_ids(model, served_model_name), defaults=Defaults(cfg, video, max_new_tokens),
            media=MediaPolicy.create(media_dir, max_upload_mb), api_key=api_key.strip() if api_key else None,
            max_queue=max_queue, prior_cache=not no_prior_cache, cache_gb=cache_gb,
            max_batch=batch, kv_gb=kv_gb, decode_ahead=2 if batch == 1 else min(batch, 8),
        )
        run(loaded, settings, sock, quiet, host)
    finally:
        sock.close()


def load_model(model, cfg, device, quant, dtype, random_weights, trust_remote_code, cuda_graphs, quiet,
               compile_model=False):
    """The model, and the default pruning config with K resolved for it (before loading)."""
    from sharp_cli import loading
    from sharp_cli.options import quiet_transformers, stderr_console

    quiet_transformers()
    cfg = loading.check_prune_config(model, cfg, random_weights=random_weights, trust_remote_code=trust_remote_code)
    with stderr_console(quiet).status(f"loading {model}"):
        loaded = loading.load(model, device=device, quant=quant, dtype=dtype, random_weights=random_weights,
                              trust_remote_code=trust_remote_code)
    loaded.use_cuda_graphs(cuda_graphs)
    loaded.use_compile(compile_model)
    return loaded, cfg


def model_ids(model: str, served_name: str | None) -> tuple[str, ...]:
    """What a request's "model" may say: the served name (listed first), -m as given, and the
    folder's or repository's last part (so a client need not repeat a long local path)."""
    ids = [served_name] if served_name else []
    ids += [model, os.path.basename(os.path.normpath(model))]
    return tuple(dict.fromkeys(i for i in ids if i))


def run(loaded, settings, sock, quiet: bool, host: str) -> None:
    from sharp_cli.serve.service import Service

    service = Service(loaded, settings)
    server = make_server(build_app(service), quiet)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    # Printed even with -q: with --port 0 it is the only way to learn the address.
    sys.stderr.write(f"sharp serve: {settings.model_ids[0]} on {loaded.device}, "
                     f"http://{shown}:{bound_port}/v1 (Ctrl-C stops)\n")
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"sharp serve: warning: listening on {host} without --api-key: anyone who reaches "
                         "this port can use the model and read videos under --media-dir\n")
    sys.stderr.flush()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)  # uvicorn re-raises SIGTERM after shutting down
    stopped = False
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        stopped = True  # uvicorn already shut down gracefully: stopping a server this way is success
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started and not stopped:
        raise SharpError("the server did not start (see the lines above)")
    if not quiet:
        sys.stderr.write("sharp serve: stopped\n")


def _raise_stopped(signum, frame):
    raise _Stopped()


# -- running: the socket, the worker's life and uvicorn around the routes of app.py ------------------
BACKLOG = 2048  # uvicorn's default
GRACEFUL_SHUTDOWN_SECONDS = 5.0  # then requests still running are cancelled (between tokens)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (IPv4 or IPv6, as the host says), so a port in use fails before the model
    loads. Listening at once matters: two sockets with SO_REUSEADDR may both bind one port while
    neither listens, so a second `sharp serve` started while the first loads its model would load
    its own and only then fail. Connections that arrive before the server runs wait in the backlog."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise SharpError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def worker_lifespan(service):
    """The service's worker runs while the server does: started before the first request, stopped
    after the last (FastAPI's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    return lifespan


def build_app(service):
    """The routes of app.py over `service`, with its worker's lifespan."""
    from sharp_cli.serve.app import create_app

    return create_app(service, lifespan=worker_lifespan(service))


def make_server(app, quiet: bool = False):
    """uvicorn, told to drain the queue the moment it starts shutting down (SIGINT, SIGTERM):
    queued requests get a 503 at once, the running answer has GRACEFUL_SHUTDOWN_SECONDS to finish,
    and uvicorn's own deadline (later) never has to cancel a request by force."""
    import uvicorn

    from sharp_cli.serve.slow_clients import timed_h11

    worker = app.state.service.worker

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            worker.drain(GRACEFUL_SHUTDOWN_SECONDS)
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            if counter % 10 == 0:
                rearm_signal_handlers()
            return await super().on_tick(counter)

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS + 10, lifespan="on",
                            http=timed_h11(app.state.service.settings.header_seconds))
    return Server(config)


def rearm_signal_handlers() -> None:
    """Install SIGINT's and SIGTERM's Python handlers (uvicorn's) again, once a second. On the GPU a
    served answer left SIGINT in native hands: the server then exited with status 1 on Ctrl-C
    before Python saw the signal (no "Shutting down", no SystemExit; idle, it stopped cleanly;
    research/serve_stop_check.sh). signal.signal with the handler Python already has re-points the
    process's handler at Python's; it must run in the main thread, where uvicorn's loop ticks."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # a server run in a thread (tests)
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            signal.signal(sig, handler)

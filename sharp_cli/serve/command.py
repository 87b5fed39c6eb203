"""`sharp serve`: one loaded model behind an OpenAI-compatible HTTP API (docs/serve.md).

sharp_cli/cli.py registers the command; nothing heavy is imported until it runs.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Optional

import typer

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
    from sharp_cli.serve.app import bind

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
    from sharp_cli.serve.app import create_app, make_server
    from sharp_cli.serve.service import Service

    service = Service(loaded, settings)
    server = make_server(create_app(service), quiet)
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
        from sharp_cli.errors import SharpError

        raise SharpError("the server did not start (see the lines above)")
    if not quiet:
        sys.stderr.write("sharp serve: stopped\n")


def _raise_stopped(signum, frame):
    raise _Stopped()

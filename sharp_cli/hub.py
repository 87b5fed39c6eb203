"""The Hugging Face Hub, asked once and quickly.

Without a network, transformers retries every file request five times with back-off before it
gives up (42 s for one config.json on the machine these lines were written on), printing a
"Retrying in 8s" line each time. sharp first sends the hub one HEAD request, bounded by
PROBE_SECONDS including the name lookup: if no answer comes, a model already in the local cache
is loaded from it (offline mode for the rest of the process) and any other gets one line that
says what to do. HF_HUB_OFFLINE=1 skips the probe.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from sharp_cli.errors import ModelError

PROBE_SECONDS = 3.0
_probed: dict[str, str | None] = {}


def is_hub_id(name: str) -> bool:
    """'org/name' or 'name' that is not a path on this machine."""
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    return name.count("/") <= 1 and bool(name.strip("/"))


def offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in ("1", "on", "yes", "true")


def go_offline() -> None:
    """Cache only, for this process and its children (transformers asks huggingface_hub each time)."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_folder(name: str) -> str | None:
    """The snapshot folder of a hub id in the local cache, if its config.json is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed id: not cached
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


def local_folder(name: str) -> str | None:
    """Where a loaded model's files are: the folder given, or its snapshot in the hub cache."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return cached_folder(name) if is_hub_id(name) else None


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """None when the hub answers one HEAD request (any HTTP status) within `timeout` seconds, else
    why not. urllib follows the proxy settings of the environment; the request runs in a thread
    of its own, so a resolver or a peer that never answers cannot stall it. (A bare TCP connect
    is not enough: some sandboxes accept a connection to any address.)"""
    url = endpoint()
    if url in _probed:
        return _probed[url]
    result: list[str | None] = [f"no answer within {timeout:g} s"]

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result[0] = None
        except urllib.error.HTTPError:  # the hub answered, if not with 200
            result[0] = None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            result[0] = getattr(reason, "strerror", None) or str(reason) or type(exc).__name__

    thread = threading.Thread(target=ask, name="sharp-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    reason = None if result[0] is None else f"{urlsplit(url).netloc}: {result[0]}"
    _probed[url] = reason
    return reason


# Offline, the one model always at hand: said wherever a hub model cannot be had.
TRY_OFFLINE = "-m sharp-tiny runs offline (the small model shipped with sharp)"


def not_cached(name: str) -> str:
    return (f"cannot load model id '{name}': it is not in the local Hugging Face cache ({cache_dir()}) and "
            f"HF_HUB_OFFLINE is set; unset it to download the model, or pass a local folder with -m; {TRY_OFFLINE}")


def check_reachable(name: str) -> None:
    """Before transformers asks the hub for `name`: return if it can (or need not), go offline
    if the hub is unreachable but the model is cached, else raise one ModelError line. The test
    models shipped in the package (model_files.SHIPPED) are the caller's to keep from the hub:
    this module sits below model_files, which asks it for cached folders."""
    if not is_hub_id(name):
        return
    if offline():
        go_offline()  # HF_HUB_OFFLINE set after huggingface_hub was imported counts too
        return
    reason = unreachable()
    if reason is None:
        return
    if cached_folder(name):
        go_offline()
        return
    raise ModelError(f"cannot reach the Hugging Face Hub ({reason}) and '{name}' is not in the local cache "
                     f"({cache_dir()}): pass a local folder with -m, or set HF_HUB_OFFLINE=1 to work from the "
                     f"cache only; {TRY_OFFLINE}")

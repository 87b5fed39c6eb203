"""`sharp env`: what this machine runs sharp with, for a bug report or a first check of a GPU box."""

from __future__ import annotations

import typer


def env_command():
    """Versions of Python, torch, transformers, bitsandbytes, the video decoders, CUDA and the GPU."""
    import importlib.metadata as md
    import platform

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    lines = [("python", platform.python_version()), ("sharp-cli", version("sharp-cli"))]
    for dist in ("torch", "torchvision", "transformers", "accelerate", "bitsandbytes"):
        lines.append((dist, version(dist)))
    # The decoders by the module that imports (decord2 installs the `decord` module), and from which
    # distribution; both decord and decord2 installed overwrite each other's files.
    from sharp_cli.video import available_backends

    found = available_backends()
    providers = md.packages_distributions()
    for module, key in (("av", "pyav"), ("decord", "decord")):
        dists = sorted(set(providers.get(module, [])))
        origin = f" (from {', '.join(dists)})" if dists and dists != [module] else ""
        clash = "; decord and decord2 are both installed: keep decord2 only" if len(dists) > 1 else ""
        lines.append((f"{module} (module)", (found[key] or "cannot be imported") + origin + clash))
    import torch

    lines.append(("cuda (torch build)", torch.version.cuda or "none (CPU build)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append((f"gpu {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    else:
        lines.append(("gpu", "none visible"))
    lines.append(("video decoders", ", ".join(f"{k} {v}" for k, v in found.items() if v) or "none"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key.ljust(width)}  {value}")

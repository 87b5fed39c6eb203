"""Who handles SIGINT in this process, before and after one answer (issue 11: on the GPU, `sharp
serve` exits with status 1 on SIGINT after it has answered, before Python sees the signal; idle, it
stops cleanly). Reads the process's sigaction for SIGINT and SIGTERM and names the shared library
the handler's code lives in (dladdr). Linux, glibc.

    python -m research.signal_owner --random-weights --quant none          # GPU: Qwen2.5-VL-7B
    python -m research.signal_owner -m tests-folder --device cpu
"""

from __future__ import annotations

import argparse
import ctypes
import signal


class _Sigaction(ctypes.Structure):  # glibc's struct sigaction on x86-64
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


def owners() -> dict[str, str]:
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        action = _Sigaction()
        libc.sigaction(int(sig), None, ctypes.byref(action))
        address = action.handler or 0
        if address in (0, 1):
            out[sig.name] = {0: "SIG_DFL", 1: "SIG_IGN"}[address]
            continue
        info = _DlInfo()
        found = libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info))
        where = (info.fname or b"?").decode() if found else "?"
        name = (info.sname or b"?").decode() if found else "?"
        out[sig.name] = f"{hex(address)} in {where} ({name}); Python's view: {signal.getsignal(sig)!r}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--random-weights", action="store_true")
    args = parser.parse_args()

    from sharp_cli import loading
    from sharp_cli.answer import ask
    from sharp_cli.bench import synthetic_clip
    from sharp_cli.prune import PruneConfig

    print("at start:", owners())
    loaded = loading.load(args.model, device=args.device, quant=args.quant, random_weights=args.random_weights)
    print("after loading:", owners())
    signal.signal(signal.SIGINT, lambda *_: None)  # what uvicorn does before serving
    print("after signal.signal(SIGINT):", owners())
    cfg = loaded.resolve_prune(PruneConfig(method="sharp", ratio=0.25))
    answer = ask(loaded, synthetic_clip(8, 224, 224), "what happens?", cfg, max_new_tokens=8)
    print(f"after one answer ({len(answer.tokens)} tokens):", owners())


if __name__ == "__main__":
    main()

"""The markdown tables of docs/eval.md and docs/benchmarks.md, one command each.

    python -m scripts.tables eval --model sharp-tiny --layers 2,3,6 --out OUT [--items 400]
        [--ratios 0.5,0.25,0.15,0.10] [--tables main,no-dedup] [--tie-seeds 3] [-- more sharp eval flags]
    python -m scripts.tables bench FILE.json ...

eval: the accuracy tables, every table at every K, one markdown file per K. Without --data, the
held-out split is written first (`sharp synth OUT/heldout --n ITEMS --seed 0`). Each table is one
`sharp eval` run (its results file OUT/k<K>-<table>.jsonl, its JSON summary OUT/k<K>-<table>.json; a
rerun resumes every run where it stopped). Then OUT/k<K>.md puts every table of that K into one
markdown table: the main table's rows, then each ablation's sharp rows, each row with its accuracy
over seeds, spread, and paired bootstrap intervals against the main table's fastv (same ratio) and
unpruned answers (docs/eval.md, "What the table shows"). TABLES below is the list to edit: a name,
the methods, and the raw `sharp eval` flags of the run. A method this build does not know is left
out (the markdown says so); a run that fails (a flag this build does not have) is reported in the
markdown with its error line, and the others go on.

bench: a markdown table per `sharp bench --output-json` file. What is not a bench result (a
`sharp ask --json` record, broken JSON) is skipped with a line on stderr saying why. Missing values
(a CPU run has no peak GPU memory, older files lack later columns) print as "-". The causal-aware
FLOPs limit is taken from the file, or recomputed from its token counts with the model's shipped
config when the file predates it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# -- eval: the accuracy tables ---------------------------------------------------------------------
ONE_SEED = ["--tie-seeds", "1"]  # in place of the command line's --tie-seeds N
TABLES = [
    # (name, methods, extra `sharp eval` flags); "main" gives the none and fastv rows the others compare with.
    # The ablations run one tie seed: sharp's own ties are rare (0.4-2.2% of its kept tokens at K=2 on
    # sharp-tiny), its three seeds answered alike there (spread 0 at every ratio), and a third of the
    # answers makes the ablations affordable on a CPU. The intervals still cover the questions.
    ("main", "none,fastv,random,evs,sharp", []),
    ("no-segment-mask", "sharp", ["--no-segment-mask"]),
    ("debias-subtract", "sharp", ["--debias", "subtract", *ONE_SEED]),
    ("debias-none", "sharp", ["--debias", "none", *ONE_SEED]),
    ("no-registers", "sharp", ["--no-registers", *ONE_SEED]),
    ("no-dedup", "sharp", ["--no-dedup", *ONE_SEED]),
]
RATIOS = "0.5,0.25,0.15,0.10"


def eval_tables(argv: list[str]) -> int:
    """`eval`: every table of TABLES at every K, one markdown page per K."""
    args, extra = parse_eval(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else held_out(out / "heldout", args.items)
    tables = [t for t in TABLES if not args.tables or t[0] in args.tables.split(",")]
    if not tables:
        print(f"--tables: none of {args.tables} is in TABLES ({', '.join(t[0] for t in TABLES)})", file=sys.stderr)
        return 2
    failed = 0
    started = time.perf_counter()
    for layer in [int(k) for k in args.layers.split(",")]:
        runs = [run_table(args, extra, data, out, layer, *table) for table in tables]
        failed += sum(1 for r in runs if r["error"])
        page = out / f"k{layer}.md"
        page.write_text(markdown(args, data, layer, runs))
        print(f"K={layer}: {page} ({sum(r['seconds'] for r in runs):.0f} s)", file=sys.stderr)
    print(f"all tables: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 1 if failed else 0


def parse_eval(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m scripts.tables eval", description="The accuracy tables of "
                                "docs/eval.md: every table at every K, one markdown file per K.")
    p.add_argument("--model", default="sharp-tiny")
    p.add_argument("--layers", default="2,3,6", help="comma list of K")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="items file (default: the held-out synthetic split, written to OUT/heldout)")
    p.add_argument("--items", type=int, default=400, help="held-out items to write (without --data), or to use")
    p.add_argument("--ratios", default=RATIOS)
    p.add_argument("--tables", help="comma list of table names (default: all)")
    p.add_argument("--tie-seeds", type=int, default=3)
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return p.parse_args(argv[:cut]), argv[cut + 1:]


def held_out(folder: Path, n: int) -> Path:
    items = folder / "items.jsonl"
    if not items.exists() or sum(1 for _ in items.open()) != n:
        subprocess.run([sys.executable, "-m", "sharp_cli", "synth", str(folder), "--n", str(n), "--seed", "0", "-q"],
                       check=True, stdout=subprocess.DEVNULL)
    return items


def run_table(args, extra, data: Path, out: Path, layer: int, name: str, methods: str, flags: list[str]) -> dict:
    from sharp_cli.prune.config import METHODS

    known = [m for m in methods.split(",") if m in METHODS]
    unknown = [m for m in methods.split(",") if m not in METHODS]
    stem = out / f"k{layer}-{name}"
    tie_seeds = [] if "--tie-seeds" in flags else ["--tie-seeds", str(args.tie_seeds)]  # a table's own wins
    cmd = [sys.executable, "-m", "sharp_cli", "eval", str(data), "-m", args.model, "--quant", "none",
           "--dtype", "float32", "--layer", str(layer), "--ratio", args.ratios, "--methods", ",".join(known),
           *tie_seeds, "--limit", str(args.items), *flags, *extra, "-o", f"{stem}.jsonl", "-q", "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True) if known else None
    seconds = time.perf_counter() - started
    error = None
    if done is not None and done.returncode != 0:
        error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    elif done is not None:
        Path(f"{stem}.json").write_text(done.stdout)
    shown = ["sharp eval", *cmd[4:]]
    print(f"K={layer} {name}: {error or 'done'} ({seconds:.0f} s)", file=sys.stderr)
    return {"name": name, "methods": known, "unknown": unknown, "command": " ".join(shown), "error": error,
            "seconds": seconds, "results": Path(f"{stem}.jsonl"), "summary": Path(f"{stem}.json")}


def markdown(args, data: Path, layer: int, runs: list[dict]) -> str:
    """One markdown table of every run of this K, with intervals against the main run's fastv and none."""
    from sharp_cli.evaluate import formats, runner, summary

    items = formats.load(str(data)).items[: args.items]
    records, cells, main_seeds, versus = [], [], None, {}
    for run in runs:
        if run["error"] or not run["methods"] or not run["summary"].exists():
            continue
        seeds = json.loads(run["summary"].read_text())["seeds"]
        main_run = run["name"] == "main"  # an ablation's rows are named after it; its none and fastv are not used
        main_seeds = seeds if main_run else main_seeds
        if not main_run:  # an ablation's sharp is also compared with the main run's sharp
            versus[f"sharp {run['name']}"] = "sharp"

        def label(method, name=run["name"], main_run=main_run):
            return method if main_run else f"{method} {name}"

        plan = runner.plan_cells(run["methods"], [float(r) for r in args.ratios.split(",")], seeds["tie"],
                                 seeds["random"], seeds["first"])
        cells += [(label(m), r, s) for m, r, s in plan if main_run or m not in ("none", "fastv")]
        records += [dict(rec, method=label(rec["method"])) for rec in runner.read_results(run["results"])
                    if main_run or rec["method"] not in ("none", "fastv")]
    rows = summary.summarize(records, items, list(dict.fromkeys(cells)), versus=versus)
    lines = [f"# sharp eval tables: {args.model}, K={layer}", ""]
    used = (f"{main_seeds['tie']} per score-based cell, {main_seeds['random']} for random in the main table; "
            "each row's count in its seeds column") if main_seeds else "each row's count in its seeds column"
    lines += [f"{len(items)} questions from `{data}`; ratios {args.ratios}; seeds: {used}; {platform.node()} "
              f"({platform.machine()}, {_cpus()} CPUs), float32. Columns: docs/eval.md, \"What the table shows\".", ""]
    lines += ["| method | ratio | accuracy | spread | vs fastv | vs none | vs sharp | ties | recall@k | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['ratio']:.2f} | {_pct(row['accuracy'])} | {_spread(row)} | "
                     f"{_diff(row['vs_fastv'])} | {_diff(row['vs_none'])} | {_diff(row.get('vs_method'))} | "
                     f"{_pct(row['tie_share'])} | {_pct(row['needle_recall'])} | {_seeds(row)} |")
    warning = summary.tie_warning(rows)
    lines += ["", "vs fastv, vs none, vs sharp: accuracy minus the main run's fastv at the same ratio, minus "
              "unpruned, and (an ablation's row) minus the main run's sharp at the same ratio, "
              "in points, [95% paired bootstrap interval over questions, 2,000 resamples]; ns: includes 0. "
              "spread: lowest-highest accuracy over seeds. ties: mean share of the kept tokens tied with the "
              "first dropped one. recall@k: mean share of the needle tokens kept."]
    lines += ["", warning] if warning else []
    lines += ["", "Runs:", ""]
    for run in runs:
        state = f"not run: {run['error']}" if run["error"] else f"{run['seconds']:.0f} s"
        left = f"; left out (not in this build): {', '.join(run['unknown'])}" if run["unknown"] else ""
        lines.append(f"- {run['name']} ({state}{left}): `{run['command']}`")
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _diff(d) -> str:
    if not d:
        return "-"
    text = f"{100 * d['difference']:+.1f}"
    if d.get("low") is not None:
        text += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" + ("" if d["significant"] else " ns")
    return text


def _spread(row) -> str:
    if row["accuracy_min"] is None or len(row["seeds"]) < 2:
        return "-"
    return f"{100 * row['accuracy_min']:.1f}-{100 * row['accuracy_max']:.1f}"


def _seeds(row) -> str:
    return f"{len(row['seeds'])} ({row['seeds_skipped']} skipped)" if row["seeds_skipped"] else str(len(row["seeds"]))



# -- bench: the speed tables -----------------------------------------------------------------------
BENCH_HEADER = ("| method | ratio | visual kept | LLM prefill | speed-up | FLOPs limit | efficiency | causal limit | "
          "eff. vs causal | selection | TTFT | KV cache | peak mem |")


class Skip(Exception):
    """Not a bench result this script can read; the message says why."""


def load_bench(path: str) -> dict:
    """A `sharp bench --output-json` file's contents, or Skip saying why it is not one."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise Skip(exc.strerror or str(exc)) from None
    except json.JSONDecodeError as exc:
        raise Skip(f"not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and "answer" in data and "rows" not in data:
        raise Skip("a `sharp ask` result, not a `sharp bench` one")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise Skip("no bench rows in it")
    return data


def causal_limits(data: dict, name: str) -> list:
    """Per row: the file's causal FLOPs limit, else recomputed from the shipped config, else None."""
    rows = data["rows"]
    if all(r.get("flops_limit_causal") is not None for r in rows):
        return [r["flops_limit_causal"] for r in rows]
    base = next((r for r in rows if r.get("method") == "none"), None)
    try:
        from sharp_cli import measure
        from sharp_cli.models.random_init import load_config

        dims = measure.text_dims(load_config(name))
    except Exception:  # a model without a shipped config: the column stays empty
        return [r.get("flops_limit_causal") for r in rows]
    out = []
    for r in rows:
        try:
            seq, kept, k = base["sequence_tokens"], r["tokens_after_pruning"], r.get("layer") or 2
            full = measure.prefill_flops(dims, seq, seq, k, measure.causal_layer_flops)
            out.append(full / measure.prefill_flops(dims, seq, kept, k, measure.causal_layer_flops))
        except (KeyError, TypeError, ZeroDivisionError):
            out.append(r.get("flops_limit_causal"))
    return out


def fmt(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:{spec}}{unit}"


def bench_table(path: str, data: dict) -> list[str]:
    """The markdown lines of one bench result: a title naming the setup and the file, then the rows."""
    name = str(data.get("model", "?")).split("random-models/")[-1].replace("--", "/")
    size = data.get("frame_size") or ["?", "?"]
    graphs = {True: "CUDA graphs", False: "no CUDA graphs"}.get(data.get("cuda_graphs"), "CUDA graphs: ?")
    lines = ["", f"**{name}**, {data.get('quant', '?')}/{data.get('dtype', '?')}, {data.get('frames', '?')} frames "
             f"{size[0]}x{size[1]}, K={data.get('layer', '?')}, {graphs}, median of {data.get('iters', '?')} "
             f"after {data.get('warmup', '?')} warm-up, {data.get('gpu') or data.get('device', '?')} (`{path}`)", "",
             BENCH_HEADER, "|---" * BENCH_HEADER.count(" | ") + "|---|"]
    for r, limit_c in zip(data["rows"], causal_limits(data, name)):
        speedup = r.get("speedup")
        vs_causal = speedup / limit_c if speedup is not None and limit_c else None
        kept, total = r.get("visual_tokens_kept"), r.get("visual_tokens_total")
        selection = fmt(r.get("selection_seconds"), ".2f", 1e3, " ms")
        if r.get("selection_share") is not None:
            selection += f" ({r['selection_share']:.1%})"
        lines.append(" | ".join([
            f"| {r.get('method', '?')}", fmt(r.get("ratio"), ".2f"),
            f"{kept:,}/{total:,}" if kept is not None and total is not None else "-",
            fmt(r.get("prefill_seconds"), ".1f", 1e3, " ms"), fmt(speedup, ".2f", unit="x"),
            fmt(r.get("flops_limit"), ".2f", unit="x"), fmt(r.get("efficiency"), ".0%"), fmt(limit_c, ".2f", unit="x"),
            fmt(vs_causal, ".0%"), selection, fmt(r.get("ttft_seconds"), ".0f", 1e3, " ms"),
            fmt(r.get("kv_cache_bytes"), ".1f", 2**-20, " MiB"), fmt(r.get("peak_memory_bytes"), ".2f", 2**-30, " GiB"),
        ]) + " |")
    return lines


def bench_tables(paths: list[str]) -> int:
    """`bench`: one markdown table per result file; exit code 1 when none could be read."""
    made, skipped = 0, []
    for path in paths:
        try:
            lines = bench_table(path, load_bench(path))
        except Skip as why:
            skipped.append(path)
            print(f"skipped {path}: {why}", file=sys.stderr)
            continue
        print("\n".join(lines))
        made += 1
    print(f"{made} table(s) from {len(paths)} file(s); {len(skipped)} skipped", file=sys.stderr)
    return 0 if made or not paths else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("eval", "bench"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return eval_tables(argv[1:]) if argv[0] == "eval" else bench_tables(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

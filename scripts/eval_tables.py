"""The accuracy tables of docs/eval.md, one command: every table at every K, one markdown file per K.

    python scripts/eval_tables.py --model sharp-tiny --layers 2,3,6 --out OUT [--items 400]
        [--ratios 0.5,0.25,0.15,0.10] [--tables main,no-dedup] [--tie-seeds 3] [-- more sharp eval flags]

Without --data, the held-out split is written first (`sharp synth OUT/heldout --n ITEMS --seed 0`).
Each table is one `sharp eval` run (its results file OUT/k<K>-<table>.jsonl, its JSON summary
OUT/k<K>-<table>.json; a rerun resumes every run where it stopped). Then OUT/k<K>.md puts every
table of that K into one markdown table: the main table's rows, then each ablation's sharp rows,
each row with its accuracy over seeds, spread, and paired bootstrap intervals against the main
table's fastv (same ratio) and unpruned answers (docs/eval.md, "What the table shows").

TABLES below is the list to edit: a name, the methods, and the raw `sharp eval` flags of the run.
A method this build does not know is left out (the markdown says so); a run that fails (a flag
this build does not have) is reported in the markdown with its error line, and the others go on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TABLES = [
    # (name, methods, extra `sharp eval` flags); "main" gives the none and fastv rows the others compare with
    ("main", "none,fastv,random,evs,sharp", []),
    ("no-segment-mask", "sharp", ["--no-segment-mask"]),
    ("debias-subtract", "sharp", ["--debias", "subtract"]),
    ("debias-none", "sharp", ["--debias", "none"]),
    ("no-registers", "sharp", ["--no-registers"]),
    ("no-dedup", "sharp", ["--no-dedup"]),
]
RATIOS = "0.5,0.25,0.15,0.10"


def main(argv=None) -> int:
    args, extra = parse(argv)
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


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sharp-tiny")
    p.add_argument("--layers", default="2,3,6", help="comma list of K")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="items file (default: the held-out synthetic split, written to OUT/heldout)")
    p.add_argument("--items", type=int, default=400, help="held-out items to write (without --data), or to use")
    p.add_argument("--ratios", default=RATIOS)
    p.add_argument("--tables", help="comma list of table names (default: all)")
    p.add_argument("--tie-seeds", type=int, default=3)
    argv = sys.argv[1:] if argv is None else list(argv)
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
    cmd = [sys.executable, "-m", "sharp_cli", "eval", str(data), "-m", args.model, "--quant", "none",
           "--dtype", "float32", "--layer", str(layer), "--ratio", args.ratios, "--methods", ",".join(known),
           "--tie-seeds", str(args.tie_seeds), "--limit", str(args.items), *flags, *extra,
           "-o", f"{stem}.jsonl", "-q", "--json"]
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
    records, cells, seeds = [], [], None
    for run in runs:
        if run["error"] or not run["methods"] or not run["summary"].exists():
            continue
        seeds = json.loads(run["summary"].read_text())["seeds"]
        main_run = run["name"] == "main"  # an ablation's rows are named after it; its none and fastv are not used

        def label(method, name=run["name"], main_run=main_run):
            return method if main_run else f"{method} {name}"

        plan = runner.plan_cells(run["methods"], [float(r) for r in args.ratios.split(",")], seeds["tie"],
                                 seeds["random"], seeds["first"])
        cells += [(label(m), r, s) for m, r, s in plan if main_run or m not in ("none", "fastv")]
        records += [dict(rec, method=label(rec["method"])) for rec in runner.read_results(run["results"])
                    if main_run or rec["method"] not in ("none", "fastv")]
    rows = summary.summarize(records, items, list(dict.fromkeys(cells)))
    lines = [f"# sharp eval tables: {args.model}, K={layer}", ""]
    used = f"{seeds['tie']} per score-based cell, {seeds['random']} for random" if seeds else "-"
    lines += [f"{len(items)} questions from `{data}`; ratios {args.ratios}; seeds: {used}; {platform.node()} "
              f"({platform.machine()}, {_cpus()} CPUs), float32. Columns: docs/eval.md, \"What the table shows\".", ""]
    lines += ["| method | ratio | accuracy | spread | vs fastv | vs none | ties | recall@k | seeds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['ratio']:.2f} | {_pct(row['accuracy'])} | {_spread(row)} | "
                     f"{_diff(row['vs_fastv'])} | {_diff(row['vs_none'])} | {_pct(row['tie_share'])} | "
                     f"{_pct(row['needle_recall'])} | {_seeds(row)} |")
    warning = summary.tie_warning(rows)
    lines += ["", "vs fastv, vs none: accuracy minus the main run's fastv at the same ratio, and minus unpruned, "
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


if __name__ == "__main__":
    sys.exit(main())

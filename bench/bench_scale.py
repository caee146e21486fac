"""Community scale on one machine: wall time and peak memory of every path that grows with the data.

    python bench/bench_scale.py                      # every step at the sizes of docs/scale.md (about an hour)
    python bench/bench_scale.py --quick              # every step at small sizes (a smoke check, minutes)
    python bench/bench_scale.py --steps gallery,search --output docs/scale-table.md

Each step runs in its own process and measures its parts with :func:`scale_common.measure` (wall seconds and the
peak resident memory of that part). Steps live in the ``scale_*.py`` modules beside this file, each a ``STEPS``
dict of ``name -> function(quick: bool) -> rows``; a row is a dict with ``path``, ``size``, ``seconds``,
``peak_gib`` and optional ``before`` (the same path on the code before the change, as measured then),
``target`` and ``note``.
"""

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from utils import UserError, run_cli

HERE = Path(__file__).resolve().parent
MODULES = ("scale_gallery", "scale_search", "scale_training", "scale_inference", "scale_retrieval", "scale_out",
           "scale_milvus")
COLUMNS = ("path", "size", "seconds", "peak_gib", "before", "target", "note")
MARK = "SCALE-ROWS "


def all_steps() -> dict:
    """Every registered step, in module order."""
    steps = {}
    for name in MODULES:
        if (HERE / f"{name}.py").is_file():
            steps.update(importlib.import_module(name).STEPS)
    return steps


def run_step(name: str, quick: bool) -> list[dict]:
    """Run one step in a fresh process and return its rows (a failed step is one row saying so)."""
    command = [sys.executable, str(HERE / "bench_scale.py"), "--child", name] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [{"path": name, "seconds": time.perf_counter() - start, "note": f"FAILED (exit {proc.returncode}): {tail}"}]


def format_cell(key: str, value) -> str:
    if value is None:
        return ""
    if key == "seconds":
        return f"{value:.3g}" if value < 10 else f"{value:.0f}"
    if key == "peak_gib":
        return f"{value:.2f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    header = ["path", "size", "wall s", "peak GiB", "before", "target", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(k, row.get(k)) for k in COLUMNS) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    steps = all_steps()
    if args.child:
        print(MARK + json.dumps(steps[args.child](args.quick)), flush=True)
        return
    chosen = args.steps.split(",") if args.steps else list(steps)
    unknown = [name for name in chosen if name not in steps]
    if unknown:
        raise UserError(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(steps)}")
    rows = []
    for name in chosen:
        print(f"step {name} ...", file=sys.stderr, flush=True)
        rows += run_step(name, args.quick)
        print(table(rows[-1:]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: check that every step runs")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))

"""What the one-row-per-variant benchmarks (bench/options.py, bench/preservation.py) share: their
`--only` and `--json` arguments, and measuring some rows again merged into an earlier results file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, results: Path) -> None:
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW", help="measure only these rows (names as "
                        "in the table) and merge them into the results file")
    parser.add_argument("--json", type=Path, default=None, help=f"write the results here (default {results.name} "
                        "in bench/results for a full run, nothing for --quick)")


def selected(parser: argparse.ArgumentParser, args: argparse.Namespace, variants: dict[str, dict], results: Path,
             always: tuple[str, ...] = ()) -> tuple[dict[str, dict], dict | None]:
    """(the variants to measure, the earlier results to merge them into or None): with `--only`, its rows
    (and `always`, e.g. the reference row) from the results file; else every variant given."""
    if not args.only:
        return variants, None
    unknown = [name for name in args.only if name not in variants]
    if unknown:
        parser.error(f"--only: no row named {unknown[0]!r}; the rows: {', '.join(variants)}")
    earlier = json.loads((args.json or results).read_text())
    return {k: variants[k] for k in dict.fromkeys((*always, *args.only))}, earlier


def merged(table: dict, earlier: dict | None, order: dict) -> dict:
    """The rows measured now beside the earlier run's, in `order`'s order."""
    if earlier is None:
        return table
    return {k: table[k] if k in table else earlier["table"][k] for k in order if k in table or k in earlier["table"]}

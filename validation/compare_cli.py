"""`gemma4-validate compare RUN_A RUN_B`: each gate metric's drift from run A to run B; exit 1 when one regressed."""
from __future__ import annotations

import argparse

from gemma4_support.errors import Gemma4Error
from gemma4_support.reports.compare import DEFAULT_TOLERANCE, compare_runs, format_comparison


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `compare` subcommand to gemma4-validate's subparsers."""
    cp = subparsers.add_parser(
        "compare", help="each gate metric's drift between two runs; exit 1 when one regressed",
        description="Compare two run folders (or report folders, read through their LATEST): per stage, test case and "
                    "gate metric, value A, value B, relative drift and threshold. A REGRESSION is a gate that passed in "
                    "A and fails in B, or a value that moved toward its threshold by more than --tolerance × "
                    "|threshold|. Exit 0 none, 1 a regression, 2 a usage error.")
    cp.add_argument("run_a", metavar="RUN_A", help="the earlier (baseline) run folder")
    cp.add_argument("run_b", metavar="RUN_B", help="the later run folder")
    cp.add_argument("--tolerance", default=str(DEFAULT_TOLERANCE), metavar="REL",
                    help=f"a move toward the threshold larger than REL × |threshold| is a regression "
                         f"(default {DEFAULT_TOLERANCE:g})")
    return cp


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the drift of every gate metric from RUN_A to RUN_B; 1 when a regression is flagged, else 0."""
    try:
        tolerance = float(args.tolerance)
    except ValueError:
        raise Gemma4Error(f"--tolerance {args.tolerance!r} is not a number",
                          "pass a fraction of the threshold, e.g. --tolerance 0.1") from None
    comparison = compare_runs(args.run_a, args.run_b, tolerance)
    print(format_comparison(comparison))
    return 1 if comparison.regressions else 0

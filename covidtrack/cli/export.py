"""``export``: every stored metric as CSV or Parquet, long and wide, the change vs baseline, and
(``--lesions``) every lesion followed from the baseline."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> int:
    from covidtrack.pipeline import export_metrics

    import sys

    warn = lambda line: print(f"left out of change_vs_baseline: {line}", file=sys.stderr)  # noqa: E731
    for path in export_metrics(args.out, args.format, all_versions=args.all_versions, lesions=args.lesions, warn=warn):
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export metrics (long, wide, units), change vs baseline and optionally lesions, as csv or parquet")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--all-versions", action="store_true",
                   help="every model version and correction, not only the numbers the dashboard shows")
    p.add_argument("--lesions", action="store_true",
                   help="also every lesion followed from the baseline (reads and labels every change map)")
    p.set_defaults(func=_export)

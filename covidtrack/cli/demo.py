"""``python -m covidtrack demo --out DIR``: write a synthetic demo cohort (NIfTI + manifest.csv)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="write a synthetic demo cohort (NIfTI scans + manifest.csv)",
        description=(
            "Write synthetic COVID-19 chest CT follow-ups of N patients in two treatment arms "
            "(3-6 scans each, every 3-5 days) as NIfTI files, a manifest.csv (patient, arm, date, path) "
            "and the true lobe/infection masks with truth.csv."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--patients", type=int, default=8, help="number of patients (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort")
    parser.add_argument("--no-truth", action="store_true", help="do not write the true masks and truth.csv")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidtrack.errors import InputError
    from covidtrack.events import Progress
    from covidtrack.phantom import write_demo_cohort

    if args.patients < 1:
        print("error: --patients must be at least 1", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder", "pass a new or existing folder to --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create the folder ({err.strerror})", "choose a writable location for --out") from err

    def show(event: Progress) -> None:
        print(f"[{event.fraction * 100:5.1f}%] {event.message}", file=sys.stderr, flush=True)

    manifest = write_demo_cohort(
        out, n_patients=args.patients, seed=args.seed, with_truth=not args.no_truth, progress=show
    )
    print(manifest)
    return 0

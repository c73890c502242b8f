"""``python -m covidtrack series PATH``: list the DICOM series under a folder (or describe a file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "series",
        help="list DICOM series under a folder (UID, modality, slices, thickness, kernel, date)",
        description="List every DICOM series under PATH. With --check, also load the series that "
        "`load_ct` would pick (or --series-uid) and print its canonical geometry and notes.",
    )
    parser.add_argument("path", type=Path, help="DICOM folder (searched recursively) or a NIfTI/NRRD/MHA file")
    parser.add_argument("--check", action="store_true", help="load the chosen series and report geometry")
    parser.add_argument("--series-uid", default=None, help="series to check (default: the one load_ct picks)")
    parser.set_defaults(func=run)


def _fmt(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    from covidtrack.io import load_ct, scan_folder

    path: Path = args.path
    if path.is_dir() or not path.exists():
        scan = scan_folder(path)
        header = ("series UID", "mod", "orient", "images", "thick mm", "kernel", "study date", "description")
        rows = [
            (
                s.series_uid,
                s.modality + ("*" if s.is_localizer else ""),
                s.orientation,
                str(s.n_slices),
                _fmt(s.slice_thickness_mm),
                _fmt(s.kernel),
                _fmt(s.study_date),
                _fmt(s.description),
            )
            for s in scan.series
        ]
        if not rows and not scan.unreadable:
            print(f"error: {path}: no DICOM series in this folder or its subfolders. Fix: pass the folder that "
                  "holds the .dcm files, or a NIfTI/NRRD/MHA file", file=sys.stderr)
            return 1
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if any(s.is_localizer for s in scan.series):
            print("* localizer / scout images (never chosen automatically)")
        for bad, reason in scan.unreadable:
            print(f"unreadable: {bad}: {reason}")
    if args.check or path.is_file():
        vol = load_ct(path, series_uid=args.series_uid)
        z, y, x = vol.shape
        print(f"loaded {vol.meta.source_format.upper()} '{vol.meta.source_name}': {z}x{y}x{x} (z, y, x) voxels, "
              f"spacing {', '.join(f'{s:.3f}' for s in vol.spacing)} mm, HU {int(vol.array.min())}..{int(vol.array.max())}")
        for note in vol.meta.notes:
            print(f"note: {note}")
    return 0

"""``ingest`` and ``ingest-manifest``: scans into the store, with a progress bar on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from covidtrack.events import Progress


class ProgressBar:
    """A one-line bar on a terminal (redrawn with ``\\r``); one line per stage otherwise (logs)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: tuple[str, str] = ("", "")

    def __call__(self, ev: Progress) -> None:
        filled = int(round(ev.fraction * self.width))
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {ev.fraction * 100:5.1f}% {ev.stage}: {ev.message}"
        if self.tty:
            self.stream.write("\r" + text[:160].ljust(160))
            if ev.stage in ("done", "summary", "failed"):
                self.stream.write("\n")
        elif (ev.stage, ev.item) != self._last or ev.stage in ("failed", "summary"):
            self.stream.write(text + "\n")  # not a terminal: one line per stage, no redraw noise
        self._last = (ev.stage, ev.item)
        self.stream.flush()


def _warn_default_salt() -> None:
    from covidtrack.config import DEFAULT_SALT_WARNING, settings

    if settings().salt_is_default:
        print(f"warning: {DEFAULT_SALT_WARNING}", file=sys.stderr)


def _ingest(args: argparse.Namespace) -> int:
    from covidtrack.pipeline import drain, ingest

    _warn_default_salt()
    result = drain(
        ingest(args.path, args.patient, args.date, arm=args.arm, alias=args.alias, register=not args.no_register,
               series_uid=args.series_uid, accept_other_id=args.accept_other_id),
        ProgressBar(),
    )
    state = "stored" if result.created else "already stored"
    print(f"{result.scan_id}\t{state}\tpatient {result.patient_key}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _ingest_manifest(args: argparse.Namespace) -> int:
    from covidtrack.pipeline import drain, ingest_manifest

    _warn_default_salt()
    summary = drain(ingest_manifest(args.manifest, register=not args.no_register, accept_other_id=args.accept_other_id),
                    ProgressBar())
    print(summary.describe())
    return 1 if summary.failed else 0


ACCEPT_HELP = ("store a scan even if its DICOM PatientID or sex differs from the patient's other scans "
               "(or matches another patient's); the scan is flagged")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="load, segment, measure and store one CT scan")
    p.add_argument("path", help="DICOM folder or NIfTI / NRRD / MHA file")
    p.add_argument("--patient", required=True, help="patient ID (stored only as a salted hash)")
    p.add_argument("--date", default=None, help="study date YYYY-MM-DD (default: from the DICOM header)")
    p.add_argument("--arm", default=None, help="cohort arm, e.g. treated / control")
    p.add_argument("--alias", default=None, help="name to show instead of the pseudonymous key")
    p.add_argument("--series-uid", default=None,
                   help="SeriesInstanceUID of the series to load when the folder holds several (see `series`)")
    p.add_argument("--no-register", action="store_true", help="skip registration to the baseline")
    p.add_argument("--accept-other-id", action="store_true", help=ACCEPT_HELP)
    p.set_defaults(func=_ingest)

    m = sub.add_parser("ingest-manifest", help="ingest every scan listed in a CSV (patient,date,path[,arm,alias,series_uid])")
    m.add_argument("manifest", help="CSV file; relative paths are relative to it")
    m.add_argument("--no-register", action="store_true", help="skip registration to the baseline")
    m.add_argument("--accept-other-id", action="store_true", help=ACCEPT_HELP + " (every row)")
    m.set_defaults(func=_ingest_manifest)

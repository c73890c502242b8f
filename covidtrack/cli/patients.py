"""``patients``: list the stored patients (and with ``--scans`` their scans), the keys and
scan IDs the other commands take."""

from __future__ import annotations

import argparse


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return str(value)[:10] if hasattr(value, "isoformat") else str(value)


def _patients(args: argparse.Namespace) -> int:
    from covidtrack.store import Store

    with Store.open(read_only=True) as store:
        pats = store.patients()
        if pats.empty:
            print(f"no patients stored in {store.path}")
            return 0
        rows = [(_text(p.patient_key), _text(p.alias), _text(p.arm), str(int(p.n_scans)), _text(p.first_date), _text(p.last_date))
                for p in pats.itertuples()]
        print(_table(rows, ("patient key", "alias", "arm", "scans", "first", "last")))
        if args.scans:
            scans = store.scans()
            rows = [(_text(s.scan_id), _text(s.patient_key), _text(s.alias), _text(s.study_date), str(int(s.day)),
                     _text(s.source_name)) for s in scans.itertuples()]
            print()
            print(_table(rows, ("scan id", "patient key", "alias", "date", "day", "source")))
    return 0


def _remove_scan(args: argparse.Namespace) -> int:
    from covidtrack import longitudinal
    from covidtrack.cli.ingest import ProgressBar
    from covidtrack.errors import InputError
    from covidtrack.store import Store

    with Store.open() as store:
        scans = store.scans()
        row = scans[scans["scan_id"] == args.scan_id]
        if row.empty:
            raise InputError(args.scan_id, "no such scan", "`python -m covidtrack patients --scans` lists the stored scans")
        r = row.iloc[0]
        what = f"scan {args.scan_id} of patient {_text(r.alias) if isinstance(r.alias, str) else r.patient_key}, dated {_text(r.study_date)}"
        if not args.yes:
            print(f"would remove {what} with its masks, metrics, corrections and registrations; add --yes to remove it")
            return 1
        done = longitudinal.forget_scan(store, args.scan_id, progress=ProgressBar(), register=not args.no_register)
    removed = done["removed"]
    print(f"removed {what}: {removed.get('segmentations', 0)} segmentation(s), {removed.get('corrections', 0)} correction(s), "
          f"{removed.get('registrations', 0)} registration(s)" + ("; the patient has no scans left and was removed" if removed.get("patients") else ""))
    if done["was_baseline"] and done["registered"]:
        print(f"the next scan is the baseline now; {len(done['registered'])} follow-up(s) registered to it")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patients", help="list stored patients (key, alias, arm, scans); --scans lists every scan")
    p.add_argument("--scans", action="store_true", help="also list every scan (scan id, date, day since baseline)")
    p.set_defaults(func=_patients)

    r = sub.add_parser("remove-scan", help="delete a stored scan with its masks, metrics, corrections and registrations")
    r.add_argument("scan_id", help="scan id (see `patients --scans`)")
    r.add_argument("--yes", action="store_true", help="really remove it (without: say what would be removed)")
    r.add_argument("--no-register", action="store_true", help="when it was the baseline, do not register the others to the new one now")
    r.set_defaults(func=_remove_scan)

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patients", help="list stored patients (key, alias, arm, scans); --scans lists every scan")
    p.add_argument("--scans", action="store_true", help="also list every scan (scan id, date, day since baseline)")
    p.set_defaults(func=_patients)

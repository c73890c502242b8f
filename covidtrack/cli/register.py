"""``python -m covidtrack register --patient ID | --all``: (re-)register follow-ups to the baseline."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        help="register every follow-up of a patient to the baseline and store the change per lobe",
        description=(
            "Registers each follow-up scan of the patient to the earliest scan (ANTsPy affine + SyN on the "
            "lungs), writes transforms and change maps under $COVIDTRACK_HOME/registrations and stores QA "
            "figures and new / resolved / persistent infection (mL) per lobe. Pairs that are up to date are "
            "skipped unless --force."
        ),
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="pseudonymous key, alias, or the raw patient ID (hashed, never stored)")
    who.add_argument("--all", action="store_true",
                     help="every patient (only pairs that are out of date are computed, e.g. after `hitl resegment`)")
    p.add_argument("--force", action="store_true", help="recompute pairs that are already up to date")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidtrack.cli.ingest import ProgressBar
    from covidtrack.longitudinal import register_patient
    from covidtrack.report.load import resolve_patient
    from covidtrack.store import Store

    failed = 0
    per_patient = []
    Store.open(read_only=True).close()  # a missing store is an error with its fix, not a new empty one
    with Store.open() as store:
        keys = list(store.patients()["patient_key"]) if args.all else [resolve_patient(store, args.patient)]
        if not keys:
            print("no patients in the store yet: nothing to register")
        for key in keys:
            try:
                per_patient.append((key, register_patient(store, key, progress=ProgressBar(), force=args.force)))
            except Exception as err:  # noqa: BLE001 - with --all one patient's problem must not stop the others
                if not args.all:
                    raise
                failed += 1
                print(f"patient {key}: {type(err).__name__}: {err}", file=sys.stderr)
    for key, results in per_patient:
        if not results:
            if not args.all:
                print(f"patient {key}: only one scan, nothing to register")
            continue
        failed += _print(results)
    return 1 if failed else 0


def _print(results: list) -> int:
    import dataclasses

    from covidtrack.register import RegistrationQA

    failed = 0
    for r in results:
        state = "up to date" if r.reused else "registered"
        verdict = "QA ok" if r.ok else "QA FAILED"
        failed += not r.ok
        print(f"{r.moving_scan} -> {r.fixed_scan}\t{state}\t{verdict}\tlung Dice {r.qa['lung_dice']:.3f}"
              f"\tsurface {r.qa['mean_surface_mm']:.2f} mm\tfolding {100 * r.qa['folding_fraction']:.2f} %")
        if not r.ok:
            fields = {f.name for f in dataclasses.fields(RegistrationQA)}
            problems = RegistrationQA(**{k: v for k, v in r.qa.items() if k in fields}).problems
            print(f"  QA: {'; '.join(problems)}. Check both lung segmentations (Review page) and that the "
                  "scans belong to the same patient, then re-run with --force")
    return failed

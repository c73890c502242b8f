"""``python -m covidtrack report``: trend report PDFs for a patient or a cohort (same as the Report page)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a trend report PDF for a patient or a cohort")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="pseudonymous key, alias, or the raw patient ID (hashed, never stored)")
    who.add_argument("--cohort", action="store_true", help="a cohort report over all patients (or --arm)")
    p.add_argument("--arm", action="append", metavar="A", help="cohort arm to include (repeat for several; default: every treatment arm; \"(no arm)\" names patients without one)")
    p.add_argument("--out", required=True, metavar="FILE.pdf", help="where to write the PDF")
    p.add_argument("--engine", choices=("auto", "kaleido", "matplotlib"), default="auto",
                   help="figure export: kaleido with a local Chromium, or matplotlib (auto: kaleido when a browser is present)")
    p.add_argument("--no-images", action="store_true", help="patient report without the aligned CT images (faster)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covidtrack.errors import StoreError
    from covidtrack.report import load, pdf
    from covidtrack.store import Store

    with Store.open(read_only=True) as store:  # a report only reads: other readers are not blocked
        if args.patient:
            key = load.resolve_patient(store, args.patient)
            data = load.patient_report_data(store, key, with_images=not args.no_images)
            out = pdf.write_patient_pdf(data, args.out, engine=args.engine)
        else:
            from covidtrack.report.data import default_arms

            cohort = load.cohort_frame(store, arms=args.arm)
            if cohort.empty:
                known = sorted(a for a in store.patients()["arm"].dropna().unique())
                raise StoreError(f"{store.path}: no metrics for arms {args.arm or 'any'}. Fix: "
                                 + (f"use one of the stored arms: {', '.join(known)}" if known else "import scans first"))
            # as on the dashboard: without --arm every treatment arm, not the patients without one
            arms = args.arm or default_arms(sorted(cohort["arm"].dropna().unique()))
            out = pdf.write_cohort_pdf(cohort, args.out, arms=arms, engine=args.engine)
    print(f"wrote {out}")
    return 0

"""``python -m covidtrack hitl ...``: the review loop from the command line.

- ``queue [--order score|date] [--score]``: scans to review, most uncertain first;
- ``export SCAN_ID OUT [--model]``: the scan's CT and masks as NIfTI with colour tables, to correct
  in 3D Slicer / ITK-SNAP;
- ``import SCAN_ID MASK.nii.gz --table itksnap --author AB [--minutes 12]``: store a mask corrected
  in 3D Slicer / ITK-SNAP as a new correction;
- ``versions``: infection versions with validation Dice; ``promote VERSION``; ``rollback``;
- ``resegment``: re-run the active infection model on stored scans (new metric rows);
- ``agreement [--csv OUT] [--json OUT]``: how far the model's output was from what the reviewers
  accepted, per corrected scan and per model version (local validation, no inference).

Fine-tuning itself is ``python -m covidtrack train infection --from-corrections``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("hitl", help="review queue, corrected-mask import, promote / roll back model versions")
    group = parser.add_subparsers(dest="hitl_command", required=True, metavar="ACTION")

    q = group.add_parser("queue", help="scans to review (most uncertain first)")
    q.add_argument("--order", choices=("score", "date"), default="score")
    q.add_argument("--score", action="store_true", help="first score unscored scans with the active model (a forward pass each)")
    q.add_argument("--all", action="store_true", help="include reviewed scans")
    q.set_defaults(func=_queue)

    i = group.add_parser("import", help="store a corrected infection mask (NIfTI) as a new correction")
    i.add_argument("scan_id")
    i.add_argument("mask", type=Path)
    i.add_argument("--table", default="covidtrack", help="label numbering: covidtrack, slicer, itksnap, medseg, covid19_ct_seg, binary, or VALUE=CLASS,...")
    i.add_argument("--author", required=True, help="reviewer name or initials")
    i.add_argument("--minutes", type=float, default=0.0, help="time spent correcting (minutes)")
    i.add_argument("--no-register", action="store_true",
                   help="do not recompute the change vs baseline now (it is shown as out of date until `register` runs)")
    i.set_defaults(func=_import)

    e = group.add_parser("export", help="a scan's CT and masks as NIfTI with 3D Slicer / ITK-SNAP colour tables (to edit there)")
    e.add_argument("scan_id")
    e.add_argument("out", type=Path, help="output folder")
    e.add_argument("--model", action="store_true", help="the model's output, not the latest correction")
    e.set_defaults(func=_export)

    group.add_parser("versions", help="infection model versions").set_defaults(func=_versions)
    p = group.add_parser("promote", help="make a version the active infection model")
    p.add_argument("version")
    p.set_defaults(func=_promote)
    group.add_parser("rollback", help="re-activate the previously active version").set_defaults(func=_rollback)
    group.add_parser("resegment", help="re-run the active infection model on stored scans").set_defaults(func=_resegment)
    a = group.add_parser("agreement", help="model vs reviewers on the corrected scans (Dice, POI bias and limits of agreement)")
    a.add_argument("--csv", type=Path, help="write the per-scan table here")
    a.add_argument("--json", type=Path, help="write per-scan rows and the per-version summary here")
    a.set_defaults(func=_agreement)


def _queue(args: argparse.Namespace) -> int:
    from covidtrack.hitl import active
    from covidtrack.store import Store

    with Store.open(read_only=not args.score) as store:  # reading only: other readers are not blocked
        if args.score:
            scans = list(active.review_queue(store, "date", include_reviewed=args.all)["scan_id"])
            active.score_scans(store, scans, progress=lambda i, n, sid: print(f"scored {i}/{n} {sid}", flush=True))
        queue = active.review_queue(store, args.order, include_reviewed=args.all)
    if queue.empty:
        print("nothing to review")
        return 0
    print(queue.to_string(index=False))
    return 0


def _import(args: argparse.Namespace) -> int:
    from covidtrack.hitl import corrections, importing
    from covidtrack.store import Store

    from covidtrack.errors import InputError

    try:
        table = importing.parse_mapping(args.table) if "=" in args.table else args.table
    except ValueError as err:
        raise InputError("--table", str(err), "write the mapping as VALUE=CLASS,..., e.g. 5=GGO,7=consolidation") from None
    if args.minutes < 0:
        raise InputError("--minutes", f"{args.minutes:g} is negative", "give the minutes spent in the other tool (0 or more)")
    with Store.open() as store:
        volume = store.load_volume(args.scan_id)
        labels = importing.import_corrected_mask(args.mask, volume, table)
        # the mask was edited from what `hitl export` hands out: the active segmentation (a
        # correction when there is one), so that is where this correction starts
        start = store.segmentation(args.scan_id, "active")
        shown = store.load_segmentation(args.scan_id, "active")
        importing.check_not_lung_mask(labels, shown.lungs, args.mask)
        effort = corrections.effort_between(shown.infection, labels, seconds=args.minutes * 60.0)
        cid, seg_id = corrections.save_correction(store, args.scan_id, labels, effort, args.author, original_seg_id=start.seg_id)
        print(f"stored correction {cid} (segmentation {seg_id}): {effort.voxels_changed} voxels changed on {effort.slices_touched} slices")
        if not args.no_register:
            _refresh_change(store, args.scan_id)
    return 0


def _export(args: argparse.Namespace) -> int:
    from covidtrack.hitl import exporting
    from covidtrack.store import Store

    with Store.open(read_only=True) as store:
        files = exporting.export_scan(store, args.scan_id, args.out, kind="model" if args.model else "active")
    for f in files:
        print(f)
    print(f"edit infection.nii.gz in 3D Slicer or ITK-SNAP, then: python -m covidtrack hitl import {args.scan_id} "
          "infection.nii.gz --table covidtrack --author YOUR_INITIALS (see README.txt there)")
    return 0


def _refresh_change(store: object, scan_id: str) -> None:
    """Re-register the pairs the correction made stale; a failure is a warning (the correction stands)."""
    from covidtrack import longitudinal
    from covidtrack.cli.ingest import ProgressBar

    try:
        done = longitudinal.refresh_after_change(store, scan_id, progress=ProgressBar())  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - the correction is stored; say how to redo the change
        print(f"warning: change vs baseline not updated ({type(err).__name__}: {err}); "
              "run `python -m covidtrack register --patient ID`", file=sys.stderr)
        return
    redone = [r for r in done if not r.reused]
    if redone:
        print(f"change vs baseline recomputed for {len(redone)} follow-up(s)")


def _versions(args: argparse.Namespace) -> int:
    from covidtrack.hitl import retrain

    table = retrain.versions_frame()
    print("no infection model installed" if table.empty else table.to_string(index=False))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from covidtrack.hitl import retrain
    from covidtrack.store import Store

    with Store.open() as store:
        ref = retrain.promote(store, args.version)
    print(f"{ref.name} is now the active infection model; `python -m covidtrack hitl resegment` adds its numbers to stored scans")
    evaluation = ref.card().get("hitl", {}).get("evaluation", {})
    old, new = evaluation.get("old_headline", {}), evaluation.get("new_headline", {})
    worse = [f"{k.replace('dice_', '')} {old[k]:.3f} -> {new[k]:.3f}" for k in ("dice_reviewed", "dice_real", "dice_phantom")
             if isinstance(old.get(k), (int, float)) and isinstance(new.get(k), (int, float)) and new[k] < old[k]]
    if worse:
        print(f"warning: {ref.name} scored lower than the model it was tuned from on its validation set ({'; '.join(worse)}); "
              "`python -m covidtrack hitl rollback` undoes the promotion", file=sys.stderr)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from covidtrack.hitl import retrain
    from covidtrack.store import Store

    with Store.open() as store:
        ref = retrain.rollback(store)
    print(f"rolled back: {ref.name} is the active infection model again")
    return 0


def _resegment(args: argparse.Namespace) -> int:
    from covidtrack.hitl import retrain
    from covidtrack.store import Store

    with Store.open() as store:
        added = retrain.resegment(store, progress=lambda i, n, sid: print(f"{i}/{n} {sid}", flush=True))
    print(f"added {len(added)} segmentation(s) with the active infection model")
    if added:
        print("the change vs baseline of these scans is now out of date: `python -m covidtrack register --all` "
              "recomputes it (only the pairs that changed)")
    return 0


def _agreement(args: argparse.Namespace) -> int:
    import json

    from covidtrack.hitl import agreement
    from covidtrack.store import Store

    with Store.open(read_only=True) as store:
        table = agreement.agreement_table(store)
    if table.empty:
        print("no corrected scans yet: correct scans on the Review page or with `hitl import`")
        return 0
    summary = agreement.agreement_summary(table)
    shown = table.drop(columns=["patient_key"]).assign(alias=[a if isinstance(a, str) else "" for a in table["alias"]])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nPOI difference = model - reviewer (percentage points); limits of agreement = bias +- 1.96 SD. "
          "Corrected scans are the ones reviewers chose: expect them harder than average.")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"scans": json.loads(table.to_json(orient="records", date_format="iso")),
                   "summary": json.loads(summary.to_json(orient="records"))}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

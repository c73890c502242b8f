"""Metric accuracy of the whole product on phantoms with exact truth, and ingest throughput.

20 phantom scans of the demo cohort (``covidtrack.phantom.write_demo_cohort``) go through the
real pipeline (``covidtrack.pipeline.ingest_manifest``: load, the product's own segmentation with
the active models, metrics, store, registration of follow-ups). The stored metrics are compared
with ``covidtrack.metrics.scan_metrics`` on the phantoms' truth masks (same function, so the
difference is segmentation error only):

- whole-lung POI: mean absolute error in percentage points (goal <= 0.3 pp), bias;
- per-lobe POI MAE (pp), infection / GGO / consolidation volume error (%), lung volume error (%);
- CT severity score: per-lobe exact agreement, total-score MAE.

Throughput: wall time per scan and per stage (from the progress events), scans per minute.

    python bench/metrics_bench.py [--scans 20]   ->  bench/results/metrics_bench.json
Everything is written under a temporary COVIDTRACK_HOME that is removed afterwards.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def truth_metrics(scan_path: Path, lobes_path: Path, inf_path: Path) -> pd.DataFrame:
    from covidtrack import io, metrics
    from covidtrack.labels import LOBE_SIDE
    from covidtrack.segment.types import Segmentation

    vol = io.load_ct(scan_path)
    lobes = io.load_mask(lobes_path, vol).astype(np.uint8)
    inf = io.load_mask(inf_path, vol).astype(np.uint8)
    lut = np.zeros(256, np.uint8)
    for lobe, side in LOBE_SIDE.items():
        lut[lobe] = side
    lungs = lut[lobes]  # the phantom's lungs are exactly the union of its lobes
    return metrics.scan_metrics(vol, Segmentation(lungs=lungs, infection=inf, lobes=lobes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "metrics_bench.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="covidtrack-metrics-bench-") as tmp:
        os.environ["COVIDTRACK_HOME"] = str(Path(tmp) / "home")
        from covidtrack import modelstore, phantom, pipeline
        from covidtrack.store import Store

        models = {}
        for task in ("lungs", "infection", "lobes"):
            try:
                models[task] = modelstore.active(task).name
            except Exception as err:  # noqa: BLE001 - recorded, the bench still says what ran
                models[task] = f"unavailable: {err}"
        cohort = Path(tmp) / "cohort"
        t0 = time.perf_counter()
        manifest = phantom.write_demo_cohort(cohort, n_patients=args.patients, seed=7)
        gen_s = time.perf_counter() - t0
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        truth_rows = {(r["patient"], r["date"]): r for r in csv.DictReader(open(cohort / "truth.csv", newline=""))}
        # whole patients first, cut at --scans (keeps each patient's series in date order)
        rows = rows[: args.scans]
        sub = cohort / "bench_manifest.csv"
        with open(sub, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)

        stage_time: dict[str, float] = defaultdict(float)
        last = {"stage": None, "t": time.perf_counter()}

        def on_event(ev):  # time spent per stage, from the same events the progress bar shows
            now = time.perf_counter()
            if last["stage"] is not None:
                stage_time[last["stage"]] += now - last["t"]
            last["stage"], last["t"] = ev.stage, now

        t0 = time.perf_counter()
        with Store.open() as store:
            summary = pipeline.drain(pipeline.ingest_manifest(sub, store=store, register=not args.no_register), on_event)
            ingest_s = time.perf_counter() - t0
            scans = store.scans()
            got = store.metrics(model_version="active")

        per_scan = []
        for r, res in zip([r for r in rows if not any(str(cohort / r["path"]) == f for f, _ in summary.failed)], summary.ok):
            t = truth_rows[(r["patient"], r["date"])]
            truth = truth_metrics(cohort / r["path"], cohort / t["lobes_path"], cohort / t["infection_path"])
            pred = got[got.scan_id == res.scan_id]
            merged = truth.merge(pred[["region", "metric", "value"]], on=["region", "metric"], suffixes=("_true", "_pred"))
            merged["scan_id"], merged["patient"], merged["date"] = res.scan_id, r["patient"], r["date"]
            per_scan.append(merged)
        all_rows = pd.concat(per_scan, ignore_index=True)

    def sel(region, metric):
        return all_rows[(all_rows.region == region) & (all_rows.metric == metric)]

    def mae(df):
        return float(np.nanmean(np.abs(df.value_pred - df.value_true)))

    def pct_err(df, floor_ml=1.0):
        ok = df[df.value_true >= floor_ml]  # % error is meaningless on near-empty truth
        e = 100 * (ok.value_pred - ok.value_true) / ok.value_true
        return {"mean_abs_pct": round(float(np.abs(e).mean()), 2), "mean_signed_pct": round(float(e.mean()), 2), "n": int(len(ok))}

    poi = sel("whole", "poi")
    lobes = ["RUL", "RML", "RLL", "LUL", "LLL"]
    per_lobe = {lb: round(mae(sel(lb, "poi")), 3) for lb in lobes}
    sev_lobes = all_rows[(all_rows.region.isin(lobes)) & (all_rows.metric == "severity_score")]
    sev_total = sel("whole", "severity_score")
    n_ok = len(summary.ok)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    report = {
        "what": "stored metrics from the real pipeline (product segmentation) vs scan_metrics on the phantom truth masks; ingest throughput",
        "data": f"{n_ok} phantom scans of covidtrack.phantom.write_demo_cohort(n_patients={args.patients}, seed=7), first {args.scans} manifest rows "
                f"({scans.patient_key.nunique()} patients), demo grid",
        "model_versions": models,
        "stored_model_tags": sorted(set(got.model_version)),
        "failed": [list(f) for f in summary.failed],
        "whole_poi": {"mae_pp": round(mae(poi), 3), "bias_pp": round(float((poi.value_pred - poi.value_true).mean()), 3),
                      "max_abs_pp": round(float(np.abs(poi.value_pred - poi.value_true).max()), 3),
                      "true_range_pct": [round(float(poi.value_true.min()), 2), round(float(poi.value_true.max()), 2)],
                      "goal_mae_pp": 0.3},
        "lobe_poi_mae_pp": per_lobe,
        "infection_volume_error": pct_err(sel("whole", "infection_volume")),
        "ggo_volume_error": pct_err(sel("whole", "ggo_volume")),
        "consolidation_volume_error": pct_err(sel("whole", "consolidation_volume")),
        "lung_volume_error": pct_err(sel("whole", "lung_volume"), floor_ml=100.0),
        "severity": {
            "lobe_exact_agreement": round(float((sev_lobes.value_pred == sev_lobes.value_true).mean()), 3) if len(sev_lobes) else None,
            "lobe_within_1": round(float((np.abs(sev_lobes.value_pred - sev_lobes.value_true) <= 1).mean()), 3) if len(sev_lobes) else None,
            "total_mae": round(mae(sev_total), 3) if len(sev_total) else None,
        },
        "per_scan_whole_poi": [
            {"patient": r.patient, "date": r.date, "true": round(r.value_true, 3), "pred": round(r.value_pred, 3)}
            for r in poi.itertuples()
        ],
        "throughput": {
            "register": not args.no_register,
            "phantom_generation_s": round(gen_s, 1),
            "ingest_wall_s": round(ingest_s, 1),
            "scans_per_min": round(60 * n_ok / ingest_s, 2) if ingest_s else None,
            "seconds_per_stage": {k: round(v, 1) for k, v in sorted(stage_time.items())},
        },
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores shared with other jobs", "load_avg_1min_at_end": os.getloadavg()[0]},
        "code_commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "per_scan_whole_poi"}, indent=2))


if __name__ == "__main__":
    main()

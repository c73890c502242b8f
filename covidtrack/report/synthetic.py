"""Synthetic metric frames and aligned series for tests and benchmarks of the figures and the PDF.

These are labelled synthetic everywhere they appear; the product shows them only when a test or
benchmark builds them explicitly.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from covidtrack.report.data import LOBES, M, add_days
from covidtrack.report.viewer import AlignedSeries

if TYPE_CHECKING:
    from covidtrack.store import Store


def _severity(poi: float) -> int:
    """Pan et al. lobe score from POI (%)."""
    if poi <= 0:
        return 0
    return 1 if poi < 5 else 2 if poi <= 25 else 3 if poi < 50 else 4 if poi <= 75 else 5


def patient_rows(key: str, arm: str, start: dt.date, n_scans: int, rng: np.random.Generator, model: str = "infection/v1") -> list[dict]:
    """Long metric rows of one synthetic patient: POI rises to a peak around day 10 and falls."""
    rows: list[dict] = []
    day = 0
    peak = rng.uniform(8, 40) * (0.6 if arm.endswith("B") else 1.0)
    lobe_w = rng.dirichlet(np.ones(5) * 2) * 5  # mean 1, lower lobes vary
    for i in range(n_scans):
        date = start + dt.timedelta(days=day)
        course = np.exp(-((day - 10) / 7.0) ** 2)
        lobe_poi = np.clip(peak * course * lobe_w + rng.normal(0, 0.5, 5), 0, 100)
        lobe_ml = np.array([700, 350, 900, 900, 800.0])
        inf = lobe_poi / 100 * lobe_ml
        total_poi = float(inf.sum() / lobe_ml.sum() * 100)
        right_poi = float(inf[:3].sum() / lobe_ml[:3].sum() * 100)
        left_poi = float(inf[3:].sum() / lobe_ml[3:].sum() * 100)
        scan = f"{key}-s{i}"
        scores = [_severity(p) for p in lobe_poi]

        def add(region: str, metric: str, value: float, unit: str) -> None:
            rows.append(dict(patient_key=key, label=key, arm=arm, scan_id=scan, study_date=pd.Timestamp(date), region=region, metric=metric, value=float(value), unit=unit, model_version=model))

        for region, poi, ml in (("whole", total_poi, inf.sum()), ("right", right_poi, inf[:3].sum()), ("left", left_poi, inf[3:].sum())):
            add(region, M.POI, poi, "%")
            add(region, M.INFECTION_ML, ml, "mL")
            add(region, M.GGO_ML, ml * 0.7, "mL")
            add(region, M.CONS_ML, ml * 0.3, "mL")
            add(region, M.POI_GGO, poi * 0.7, "%")
            add(region, M.POI_CONS, poi * 0.3, "%")
        add("whole", M.SEVERITY, sum(scores), "score")
        for j, lobe in enumerate(LOBES):
            add(lobe, M.POI, lobe_poi[j], "%")
            add(lobe, M.INFECTION_ML, inf[j], "mL")
            add(lobe, M.SEVERITY, scores[j], "score")
        day += int(rng.integers(3, 6))
    return rows


def cohort_frame(n_patients: int = 20, seed: int = 0, arms: tuple[str, ...] = ("arm A", "arm B")) -> pd.DataFrame:
    """A synthetic cohort frame (see :mod:`covidtrack.report.data`), 3-6 scans per patient."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for i in range(n_patients):
        start = dt.date(2020, 3, 1) + dt.timedelta(days=int(rng.integers(0, 60)))
        rows += patient_rows(f"SYN{i:04d}", arms[i % len(arms)], start, int(rng.integers(3, 7)), rng)
    return add_days(pd.DataFrame(rows), by="patient_key")


def patient_frame(n_scans: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = patient_rows("SYN0000", "arm A", dt.date(2020, 3, 1), n_scans, rng)
    return add_days(pd.DataFrame(rows))


def aligned_series(n: int = 4, shape: tuple[int, int, int] = (24, 64, 64), seed: int = 0) -> AlignedSeries:
    """Two elliptic 'lungs' split into lobes with a blob of GGO/consolidation that grows then shrinks."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    cz, cy = shape[0] / 2, shape[1] / 2
    lungs = np.zeros(shape, np.uint8)
    for lab, cx in ((1, shape[2] * 0.3), (2, shape[2] * 0.7)):
        inside = ((z - cz) / (shape[0] * 0.45)) ** 2 + ((y - cy) / (shape[1] * 0.35)) ** 2 + ((x - cx) / (shape[2] * 0.17)) ** 2 < 1
        lungs[inside] = lab
    lobes = np.zeros(shape, np.uint8)
    upper = z > cz
    lobes[(lungs == 1) & upper] = 1
    lobes[(lungs == 1) & ~upper & (y < cy)] = 2
    lobes[(lungs == 1) & ~upper & (y >= cy)] = 3
    lobes[(lungs == 2) & upper] = 4
    lobes[(lungs == 2) & ~upper] = 5
    ct_base = np.where(lungs > 0, -850, 40).astype(np.int16)
    cts, infs, changes = [], [], []
    radii = [3, 6, 8, 5, 2, 1][:n] + [1] * max(0, n - 6)
    prev = None
    for t in range(n):
        r = radii[t]
        blob = ((z - cz * 0.6) ** 2 + (y - cy * 1.3) ** 2 + (x - shape[2] * 0.3) ** 2) < r**2
        inf = np.zeros(shape, np.uint8)
        inf[blob & (lungs > 0)] = 1
        core = ((z - cz * 0.6) ** 2 + (y - cy * 1.3) ** 2 + (x - shape[2] * 0.3) ** 2) < (r / 2) ** 2
        inf[core & (lungs > 0)] = 2
        ct = ct_base.copy()
        ct[inf == 1] = -500
        ct[inf == 2] = 0
        ct = (ct + rng.normal(0, 20, shape)).astype(np.int16)
        cts.append(ct)
        infs.append(inf)
        if t == 0:
            changes.append(None)
            base = inf > 0
        else:
            cur = inf > 0
            ch = np.zeros(shape, np.uint8)
            ch[cur & ~base] = 1
            ch[~cur & base] = 2
            ch[cur & base] = 3
            changes.append(ch)
        prev = inf
    del prev
    dates = tuple(str(dt.date(2020, 3, 1) + dt.timedelta(days=4 * t)) for t in range(n))
    return AlignedSeries(
        dates=dates, days=tuple(4 * t for t in range(n)), spacing=(5.0, 1.5, 1.5), ct=tuple(cts), infection=tuple(infs),
        lungs=(lungs,) * n, lobes=(lobes,) * n, change=tuple(changes), registered=(True,) * n,
    )


def populate_store(store: "Store", n_patients: int = 3, n_scans: int = 4, shape: tuple[int, int, int] = (24, 64, 64), seed: int = 0,
                   arms: tuple[str, ...] = ("arm A", "arm B")) -> list[str]:
    """Fill a store with synthetic patients whose metrics are computed from their masks by
    :func:`covidtrack.metrics.scan_metrics` (no segmentation network: fast, for UI/report tests).

    Writes canonical volumes and masks through the store's :class:`FileStage`, one transaction per
    scan, exactly like the pipeline. Returns the patient keys (``SYN-P<i>``).
    """
    import hashlib

    from covidtrack.metrics import scan_metrics
    from covidtrack.segment.types import Segmentation
    from covidtrack.store import FileStage, ScanRecord, SegRecord, new_scan_id, new_seg_id, write_canonical
    from covidtrack.volume import ScanMeta, Volume

    keys = []
    # labelled as what they are: geometric masks, no model
    versions = {"lungs": "synthetic-lungs/v0", "infection": "synthetic-infection/v0", "lobes": "synthetic-lobes/v0"}
    for p in range(n_patients):
        key = f"SYN-P{p}"
        keys.append(key)
        series = aligned_series(n_scans, shape, seed=seed + p)
        for t in range(n_scans):
            date = dt.date.fromisoformat(series.dates[t]) + dt.timedelta(days=7 * p)
            vol = Volume(array=series.ct[t], spacing=series.spacing, meta=ScanMeta(patient_key=key, study_date=date, source_format="phantom"))
            seg = Segmentation(lungs=series.lungs[t], infection=series.infection[t], lobes=series.lobes[t], model_versions=versions)
            content = hashlib.sha256(vol.array.tobytes() + key.encode() + str(t).encode()).hexdigest()
            scan_id = new_scan_id(content)
            seg_id = new_seg_id()
            with FileStage() as stage:
                vpath = stage.put(store.volume_path_for(scan_id), lambda path: write_canonical(path, vol))
                paths = {
                    part: stage.put(store.mask_path_for(seg_id, part), lambda path, a=getattr(seg, part): write_canonical(path, vol, a))
                    for part in ("lungs", "infection", "lobes")
                }
                store.add_scan(
                    ScanRecord(scan_id=scan_id, patient_key=key, study_date=date, content_hash=content, volume_path=vpath,
                               source_name=f"synthetic-{key}-{t}", meta={"source_format": "phantom"}),
                    SegRecord(seg_id=seg_id, scan_id=scan_id, kind="model", model_versions=versions, lungs_path=paths["lungs"],
                              infection_path=paths["infection"], lobes_path=paths["lobes"]),
                    scan_metrics(vol, seg),
                    arm=arms[p % len(arms)],
                )
    return keys

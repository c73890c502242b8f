"""The demo cohort: synthetic patients in two treatment arms, written as NIfTI + manifest."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidtrack.events import ProgressCallback, emit
from covidtrack.phantom.series import DEMO_SHAPE, DEMO_SPACING, make_series

MANIFEST_COLUMNS = ("patient", "arm", "date", "path")
TRUTH_COLUMNS = (
    "patient", "arm", "date", "day", "lungs_ml", "ggo_ml", "consolidation_ml", "infection_ml",
    "lobes_path", "infection_path",
)  # fmt: skip
# Arm B resolves its lesions faster. Modest on purpose: a dashboard should show a trend,
# not a miracle (half-lives 6-10 days in arm A vs 4.6-7.7 days in arm B).
ARMS: dict[str, float] = {"A": 1.0, "B": 1.3}


@dataclass(frozen=True)
class DemoScan:
    """One row of a demo manifest, with the path resolved."""

    patient: str
    arm: str
    date: dt.date
    path: Path


def write_demo_cohort(
    out_dir: str | Path,
    n_patients: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = DEMO_SHAPE,
    spacing: tuple[float, float, float] = DEMO_SPACING,
    *,
    with_truth: bool = True,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write a demo cohort and return the path of its ``manifest.csv``.

    ``n_patients`` synthetic patients (IDs ``DEMO01`` ...) in matched pairs over arms ``A``
    (standard care) and ``B`` (faster resolution, see :data:`ARMS`), each with 3-6 scans every
    3-5 days (the same schedule within a pair, see :func:`_paired_schedules`).
    Each scan is ``<patient>/<patient>_<date>.nii.gz`` (int16 HU, canonical LPS geometry);
    ``manifest.csv`` lists ``patient, arm, date, path`` with paths relative to ``out_dir``.
    With ``with_truth`` the true lobe and infection maps go to ``<patient>/truth/`` and their
    volumes (mL) to ``truth.csv``, so the pipeline's output can be checked against them.
    Small default grids (72 x 128 x 128 at 4.5 x 2.7 x 2.7 mm) keep the full pipeline fast.
    """
    import SimpleITK as sitk

    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 99])
    schedules = _paired_schedules(n_patients, rng)
    manifest_rows: list[dict[str, str]] = []
    truth_rows: list[dict[str, str]] = []
    for i, (arm, days, offset, peak, pair) in enumerate(schedules):
        patient = f"DEMO{i + 1:02d}"
        start = dt.date(2020, 3, 2) + dt.timedelta(days=int(rng.integers(0, 240)))
        patient_seed = int(seed) * 1000 + i
        emit(progress, "demo", i / n_patients, f"generating {patient} ({len(days)} scans, arm {arm})", patient)
        series = make_series(
            patient_seed,
            len(days),
            shape,
            spacing,
            days=days,
            resolution_rate=ARMS[arm],
            start_date=start,
            course_offset_days=offset,
            peak_day=peak,
            disease_seed=int(seed) * 1000 + 500 + pair,
        )
        pdir = out / patient
        pdir.mkdir(exist_ok=True)
        for vol, truth in series:
            date = vol.meta.study_date
            assert date is not None
            rel = Path(patient) / f"{patient}_{date.isoformat()}.nii.gz"
            sitk.WriteImage(vol.to_sitk(), str(out / rel), useCompression=True)
            manifest_rows.append({"patient": patient, "arm": arm, "date": date.isoformat(), "path": rel.as_posix()})
            if with_truth:
                tdir = pdir / "truth"
                tdir.mkdir(exist_ok=True)
                lobes_rel = Path(patient) / "truth" / f"{patient}_{date.isoformat()}_lobes.nii.gz"
                inf_rel = Path(patient) / "truth" / f"{patient}_{date.isoformat()}_infection.nii.gz"
                sitk.WriteImage(vol.to_sitk(truth.lobes), str(out / lobes_rel), useCompression=True)
                sitk.WriteImage(vol.to_sitk(truth.infection), str(out / inf_rel), useCompression=True)
                truth_rows.append(
                    {
                        "patient": patient,
                        "arm": arm,
                        "date": date.isoformat(),
                        "day": f"{truth.day:g}",
                        "lungs_ml": f"{truth.lung_ml():.1f}",
                        "ggo_ml": f"{truth.infection_ml(1):.1f}",
                        "consolidation_ml": f"{truth.infection_ml(2):.1f}",
                        "infection_ml": f"{truth.infection_ml():.1f}",
                        "lobes_path": lobes_rel.as_posix(),
                        "infection_path": inf_rel.as_posix(),
                    }
                )
    manifest = out / "manifest.csv"
    _write_csv(manifest, MANIFEST_COLUMNS, manifest_rows)
    if with_truth:
        _write_csv(out / "truth.csv", TRUTH_COLUMNS, truth_rows)
    emit(progress, "demo", 1.0, f"wrote {len(manifest_rows)} scans of {n_patients} patients", str(manifest))
    return manifest


def _paired_schedules(n_patients: int, rng: np.random.Generator) -> list[tuple[str, list[float], float, float, int]]:
    """(arm, scan days, illness day at baseline, peak day, pair) per patient, in matched A/B pairs.

    Both patients of a pair get the same follow-up schedule (3-6 scans, every 3-5 days),
    present on the same day of their illness (3-8 days in, as patients usually do), peak on
    the same illness day (9-13) and share the disease draw (severity, lesion sizes and timing;
    not their positions or the anatomy), so the arms differ by treatment, not by chance.
    """
    out: list[tuple[str, list[float], float, float, int]] = []
    for _ in range(0, n_patients, 2):
        n_tp = int(rng.integers(3, 7))
        days = [0.0] + [float(d) for d in np.cumsum(rng.integers(3, 6, size=n_tp - 1))]
        offset = float(rng.uniform(3.0, 8.0))  # patients present 3-8 days into their illness
        peak = float(rng.uniform(9.0, 13.0))
        pair = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
        out += [(arm, days, offset, peak, len(out) // 2) for arm in pair]
    return out[:n_patients]


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".csv.tmp")  # write-then-rename: readers never see half a manifest
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_manifest(manifest: str | Path) -> list[DemoScan]:
    """Rows of a demo ``manifest.csv`` with paths resolved against its folder."""
    manifest = Path(manifest)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        DemoScan(r["patient"], r["arm"], dt.date.fromisoformat(r["date"]), (manifest.parent / r["path"]).resolve())
        for r in rows
    ]

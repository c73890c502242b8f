"""The tables the dashboard and the PDF draw from, as pure pandas transforms.

Two long DataFrames travel between the store and the figures:

- **patient frame** (one patient): columns ``scan_id``, ``study_date`` (``datetime64``), ``day``
  (int, days since the patient's first scan), ``region`` (``whole``, ``right``, ``left``, ``RUL``,
  ``RML``, ``RLL``, ``LUL``, ``LLL``), ``metric``, ``value``, ``unit``, ``model_version``.
- **cohort frame** (many patients): the same plus ``patient_key``, ``label`` (alias or key) and ``arm``.

Metric names are those of :mod:`covidtrack.metrics`; the ones the dashboard plots are named once
here (:class:`M`) so a rename there is a one-line change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidtrack import metrics
from covidtrack.labels import LOBE_LABELS, REGIONS

LOBES: tuple[str, ...] = tuple(LOBE_LABELS.values())
SIDES: tuple[str, ...] = ("whole", "right", "left")


class M:
    """Metric names (as stored in the ``metric`` column) that the dashboard uses; the strings are
    those of :mod:`covidtrack.metrics`, imported so the two cannot drift apart."""

    LUNG_ML = metrics.LUNG_VOLUME
    INFECTION_ML = metrics.INFECTION_VOLUME
    GGO_ML = metrics.GGO_VOLUME
    CONS_ML = metrics.CONSOLIDATION_VOLUME
    POI = metrics.POI
    POI_GGO = metrics.GGO_POI
    POI_CONS = metrics.CONSOLIDATION_POI
    SEVERITY = metrics.SEVERITY
    MEAN_HU = metrics.INFECTION_MEAN_HU
    LESIONS = metrics.LESION_COUNT
    LARGEST_LESION_ML = metrics.LARGEST_LESION


# Human labels with units, for axes, tables and the PDF.
METRIC_LABELS: dict[str, str] = {
    M.LUNG_ML: "Lung volume (mL)",
    M.INFECTION_ML: "Infection volume (mL)",
    M.GGO_ML: "GGO volume (mL)",
    M.CONS_ML: "Consolidation volume (mL)",
    M.POI: "POI (%)",
    M.POI_GGO: "GGO POI (%)",
    M.POI_CONS: "Consolidation POI (%)",
    M.SEVERITY: "CT severity score",
    M.MEAN_HU: "Mean HU of infection",
    M.LESIONS: "Lesions (n)",
    M.LARGEST_LESION_ML: "Largest lesion (mL)",
}

#: the arm label of patients stored without one (e.g. the demo's real CT): listed, but left out of
#: arm comparisons unless chosen
NO_ARM = "(no arm)"

def default_arms(arms: list[str]) -> list[str]:
    """Arms compared by default: every treatment arm. Patients without an arm (the demo's real
    CT) are offered but not compared unless chosen, or unless they are all there is."""
    return [a for a in arms if a != NO_ARM] or arms


PATIENT_COLUMNS = ("scan_id", "study_date", "day", "region", "metric", "value", "unit", "model_version")
COHORT_COLUMNS = ("patient_key", "label", "arm", *PATIENT_COLUMNS)


# What a raised quality flag means for the reader (covidtrack.metrics.quality_flags and the
# small-lung flag), worded as what to check.
FLAG_MESSAGES: dict[str, str] = {
    metrics.FLAG_COVERAGE: "lungs touch the edge of the scan (first or last slice, or the side of the field of view): it may not cover the whole lung",
    metrics.FLAG_THICK: f"slices thicker than {metrics.MAX_SLICE_MM:g} mm: faint ground glass is blurred away or over-called",
    metrics.FLAG_COARSE: f"in-plane pixels coarser than {metrics.MAX_PIXEL_MM:g} mm: infection tends to be over-called",
    metrics.FLAG_LUNG_RANGE: "total lung volume outside 1.5-9 L: check the lung mask",
    metrics.FLAG_SMALL_LUNG: "a very small lung or lobe with very high infection: check the lung mask",
    metrics.FLAG_ASYMMETRY: "one lung much smaller than the other: a consolidated lobe or lung may be missing from the "
                            "lung mask (the POI would be far too low), or the scan misses a lung; check the lung mask",
    metrics.FLAG_IDENTITY: "DICOM patient ID or sex differs from the patient's other scans (accepted at import): "
                           "check that the scan belongs to this patient",
}


def raised_flags(frame: pd.DataFrame) -> pd.DataFrame:
    """Quality flags raised on the whole-lung rows: columns ``study_date`` (date), ``flag``,
    ``message``, one row per scan and flag, sorted by date."""
    rows = frame[(frame["region"] == "whole") & frame["metric"].isin(list(FLAG_MESSAGES)) & (frame["value"] > 0)]
    out = pd.DataFrame({"study_date": pd.to_datetime(rows["study_date"]).dt.date, "flag": rows["metric"],
                        "message": rows["metric"].map(FLAG_MESSAGES)})
    return out.drop_duplicates().sort_values(["study_date", "flag"]).reset_index(drop=True)


RESOLUTION_CHANGE = 2.0  # slice thickness or pixel size differing by this factor between dates


def resolution_lines(frame: pd.DataFrame) -> list[str]:
    """A line when the dates were acquired at very different resolutions (slice thickness or
    pixel size differing by ``RESOLUTION_CHANGE`` or more): faint ground glass is measured
    differently then, so a change in infection volume may partly be the scanner's."""
    out = []
    for metric, what in ((metrics.SLICE_MM, "slice thickness"), (metrics.PIXEL_MM, "pixel size")):
        rows = frame[(frame["region"] == "whole") & (frame["metric"] == metric)].drop_duplicates("study_date")
        rows = rows.sort_values("study_date")
        if len(rows) < 2 or rows["value"].min() <= 0:
            continue
        lo, hi = rows.loc[rows["value"].idxmin()], rows.loc[rows["value"].idxmax()]
        if hi["value"] / lo["value"] >= RESOLUTION_CHANGE:
            out.append(f"{what} differs between dates ({lo['value']:.2g} mm on {pd.Timestamp(lo['study_date']).date()}, "
                       f"{hi['value']:.2g} mm on {pd.Timestamp(hi['study_date']).date()}): infection volumes measured at "
                       "such different resolutions are not strictly comparable")
    return out


def flag_lines(frame: pd.DataFrame) -> list[str]:
    """One line per raised flag: what to check, then the dates it was raised on; then a line per
    resolution change between dates (:func:`resolution_lines`)."""
    flags = raised_flags(frame)
    lines: list[str] = []
    if not flags.empty:
        dates = flags.groupby("message", sort=False)["study_date"].apply(lambda d: ", ".join(str(x) for x in d))
        lines = [f"{message} ({when})" for message, when in dates.items()]
    return lines + resolution_lines(frame)


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def change_label(metric: str) -> str:
    """The label of a CHANGE in ``metric``: a difference of percentages is in percentage points
    ("POI (percentage points)"; "+5 %" would read as a relative change, 10 % -> 10.5 %)."""
    label = metric_label(metric)
    return label.replace("(%)", "(percentage points)") if metrics.UNITS.get(metric) == "%" or label.endswith("(%)") else label


def add_days(frame: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Add ``day`` = whole days since the first ``study_date`` (per ``by`` group when given)."""
    out = frame.copy()
    out["study_date"] = pd.to_datetime(out["study_date"])
    first = out.groupby(by)["study_date"].transform("min") if by else out["study_date"].min()
    out["day"] = (out["study_date"] - first).dt.days.astype(int)
    return out


def select(frame: pd.DataFrame, metric: str, region: str = "whole") -> pd.DataFrame:
    """Rows of one metric in one region, sorted by date."""
    rows = frame[(frame["metric"] == metric) & (frame["region"] == region)]
    return rows.sort_values("study_date")


def wide_by_date(frame: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per (date, region), one column per metric: the table a clinician downloads as CSV."""
    data = frame if metrics is None else frame[frame["metric"].isin(metrics)]
    if data.empty:
        return pd.DataFrame(columns=["study_date", "day", "region"])
    wide = data.pivot_table(index=["study_date", "day", "region"], columns="metric", values="value", aggfunc="first")
    wide = wide.reset_index()
    order = {r: i for i, r in enumerate(REGIONS)}
    wide["_o"] = wide["region"].map(order).fillna(99)
    wide = wide.sort_values(["study_date", "_o"]).drop(columns="_o")
    wide["study_date"] = pd.to_datetime(wide["study_date"]).dt.date
    wide.columns.name = None
    return wide.reset_index(drop=True)


def lobe_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per lobe and date: POI (%) and severity score 0-5, plus the whole-lung total 0-25.

    Rows are dates; columns ``<lobe> POI %`` / ``<lobe> score`` and ``Total score``. Used by the
    PDF and the patient page.
    """
    rows = []
    for (date, day), grp in frame.groupby(["study_date", "day"], sort=True):
        row: dict[str, object] = {"Date": pd.Timestamp(date).date(), "Day": int(day)}
        for lobe in LOBES:
            poi = grp[(grp.region == lobe) & (grp.metric == M.POI)]["value"]
            sev = grp[(grp.region == lobe) & (grp.metric == M.SEVERITY)]["value"]
            row[f"{lobe} POI %"] = float(poi.iloc[0]) if len(poi) else np.nan
            row[f"{lobe} score"] = int(sev.iloc[0]) if len(sev) and pd.notna(sev.iloc[0]) else None
        total = grp[(grp.region == "whole") & (grp.metric == M.SEVERITY)]["value"]
        row["Total score"] = int(total.iloc[0]) if len(total) and pd.notna(total.iloc[0]) else None
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in [c for c in out.columns if str(c).endswith("score")]:
        out[col] = out[col].astype("Int64")  # whole scores, missing where a date has no lobes (not 2.0 / NaN)
    return out


def poi_text(poi: float | None, unit: bool = True) -> str:
    """A POI (%) for tables and figures that never contradicts its severity score.

    One decimal; a trace (> 0, under 0.05 %) reads "<0.1"; a value that one decimal would round
    onto or across a severity threshold (5, 25, 50, 75 %) gets two decimals (4.96 -> "4.96", not
    "5.0", which would read as score 2), or "<5.00" / ">25.00" when even two would. "–" for none.
    """
    if poi is None or not np.isfinite(poi):
        return "–"
    suffix = " %" if unit else ""
    if 0 < poi < 0.05:
        return "<0.1" + suffix
    score = metrics.severity_from_percent(poi)
    for decimals in (1, 2):
        text = f"{poi:.{decimals}f}"
        if metrics.severity_from_percent(float(text)) == score:
            return text + suffix
    return ("<" if poi < float(text) else ">") + text + suffix


def trend_arrow(values: list[float] | np.ndarray, threshold: float = 1.0) -> str:
    """Arrow comparing the last two values: up/down when they differ by >= ``threshold`` (POI points)."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if len(vals) < 2:
        return "·"
    delta = vals[-1] - vals[-2]
    if delta >= threshold:
        return "↑ worse"
    if delta <= -threshold:
        return "↓ better"
    return "→ stable"


def patient_summary(cohort: pd.DataFrame) -> pd.DataFrame:
    """One row per patient for the Patients list (pseudonymous key or alias only, never a name).

    Columns: ``patient_key``, ``label``, ``arm``, ``scans``, ``first``, ``last``, ``latest POI %``,
    ``latest score``, ``trend``, ``checks`` (how many "check before reading" lines the patient page
    shows: quality flags and resolution changes, see :func:`flag_lines`; 0 where the cohort frame
    carries no flag rows).
    """
    cols = ["patient_key", "label", "arm", "scans", "first", "last", "latest POI %", "latest score", "trend", "checks"]
    if cohort.empty:
        return pd.DataFrame(columns=cols)
    whole = cohort[cohort.region == "whole"]
    rows = []
    for key, grp in cohort.groupby("patient_key", sort=False):
        # one row per scan in date order: "latest" is the latest scan's own value ("–" where it has
        # none), never an older scan's; the trend compares the last two scans as they are
        per_scan = (whole[(whole.patient_key == key) & whole.metric.isin([M.POI, M.SEVERITY])]
                    .groupby(["study_date", "scan_id", "metric"])["value"].first().unstack("metric")
                    .reindex(columns=[M.POI, M.SEVERITY]).sort_index())
        p = per_scan[M.POI].to_numpy(dtype=float)
        last_sev = per_scan[M.SEVERITY].iloc[-1] if len(per_scan) else np.nan
        dates = pd.to_datetime(grp["study_date"])
        rows.append(
            {
                "patient_key": key,
                "label": grp["label"].iloc[0],
                "arm": grp["arm"].iloc[0],
                "scans": int(grp["scan_id"].nunique()),
                "first": dates.min().date(),
                "last": dates.max().date(),
                "latest POI %": round(float(p[-1]), 2) if len(p) and np.isfinite(p[-1]) else np.nan,
                "latest score": int(last_sev) if pd.notna(last_sev) else None,
                "trend": trend_arrow(p[-2:]) if len(p) >= 2 and np.isfinite(p[-2:]).all() else "·",
                "checks": len(flag_lines(grp)),
            }
        )
    return pd.DataFrame(rows, columns=cols).sort_values(["arm", "label"]).reset_index(drop=True)


@dataclass(frozen=True)
class PatientHeader:
    """What the patient page and the PDF print at the top. ``label`` is an alias or the key."""

    patient_key: str
    label: str
    arm: str
    dates: tuple[str, ...]
    model_versions: tuple[str, ...]


def header_from_frame(patient_key: str, label: str, arm: str, frame: pd.DataFrame) -> PatientHeader:
    dates = tuple(str(pd.Timestamp(d).date()) for d in sorted(pd.to_datetime(frame["study_date"]).unique()))
    versions = tuple(sorted(str(v) for v in frame["model_version"].dropna().unique())) if "model_version" in frame else ()
    return PatientHeader(patient_key=patient_key, label=label, arm=arm, dates=dates, model_versions=versions)

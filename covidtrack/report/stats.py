"""Cohort statistics for the Cohort page and the cohort report. Pure functions over the cohort frame.

- per-arm mean trajectory with a 95 % confidence interval (Student t) in day bins;
- change from baseline at the last follow-up per patient;
- Mann-Whitney U between arms (two-sided) with the rank-biserial correlation as effect size;
- responders: POI at the last follow-up at most half the baseline POI.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from covidtrack.report.data import M, select


def per_patient_series(cohort: pd.DataFrame, metric: str, region: str = "whole") -> pd.DataFrame:
    """Columns ``patient_key``, ``label``, ``arm``, ``day``, ``study_date``, ``value`` for one metric."""
    rows = select(cohort, metric, region)
    return rows[["patient_key", "label", "arm", "day", "study_date", "value"]].sort_values(["patient_key", "day"])


MIN_CI_N = 3  # patients in a day bin below which no confidence interval is given


def mean_ci(series: pd.DataFrame, bin_days: int = 4, confidence: float = 0.95, floor: float | None = None,
            ceiling: float | None = None) -> pd.DataFrame:
    """Mean and t-based confidence interval per arm and day bin.

    Follow-up dates differ between patients (every 3-5 days), so days are grouped into bins of
    ``bin_days`` (bin centre reported as ``day``); a patient counts once per bin (its mean there).
    Columns: ``arm``, ``day``, ``n``, ``mean``, ``lo``, ``hi`` (``lo``/``hi`` NaN when n <
    ``MIN_CI_N``: with 2 patients the t-interval spans ~13 standard deviations and says nothing).
    ``floor`` / ``ceiling``: the smallest / largest value the quantity can take (0 for POI and
    volumes; 100 for POI and other percentages); the symmetric t-interval is cut there so a band
    never shows impossible values.
    """
    if series.empty:
        return pd.DataFrame(columns=["arm", "day", "n", "mean", "lo", "hi"])
    s = series.copy()
    s["bin"] = (np.floor(s["day"] / bin_days + 0.5) * bin_days).astype(int)
    per_patient = s.groupby(["arm", "bin", "patient_key"], as_index=False)["value"].mean()
    g = per_patient.groupby(["arm", "bin"])["value"]
    out = g.agg(n="count", mean="mean", sd="std").reset_index().rename(columns={"bin": "day"})
    tcrit = stats.t.ppf(0.5 + confidence / 2, np.maximum(out["n"] - 1, 1))
    half = tcrit * out["sd"] / np.sqrt(out["n"])
    enough = out["n"] >= MIN_CI_N
    out["lo"] = np.where(enough, out["mean"] - half, np.nan)
    if floor is not None:
        out["lo"] = np.where(enough, np.maximum(out["lo"], floor), np.nan)
    out["hi"] = np.where(enough, out["mean"] + half, np.nan)
    if ceiling is not None:
        out["hi"] = np.where(enough, np.minimum(out["hi"], ceiling), np.nan)
    return out.drop(columns="sd")


def change_from_baseline(cohort: pd.DataFrame, metric: str = M.POI, region: str = "whole") -> pd.DataFrame:
    """Per patient: baseline (the first scan), last follow-up (the last later scan with a value)
    and change (last - baseline, in the metric's unit).

    A patient whose first scan has no value (an empty lung mask gives no POI) has no baseline
    and is left out; no later scan stands in for it. A last scan without a value is skipped, and
    ``last_day`` is the day of the scan that ``last`` comes from. Patients with one usable scan
    are left out. Columns: ``patient_key``, ``label``, ``arm``, ``baseline``, ``last``,
    ``last_day``, ``change``, ``relative`` (last / baseline; NaN when baseline is 0).
    """
    series = per_patient_series(cohort, metric, region)
    cols = ["patient_key", "label", "arm", "baseline", "last", "last_day", "change", "relative"]
    if series.empty:
        return pd.DataFrame(columns=cols)
    series = series.sort_values(["patient_key", "day"], kind="stable")
    first = series.groupby("patient_key", sort=False).head(1).set_index("patient_key")
    measured = series[np.isfinite(series["value"].to_numpy(dtype=float))]
    last = measured.groupby("patient_key", sort=False).tail(1).set_index("patient_key")
    out = first[["label", "arm"]].assign(baseline=first["value"], first_day=first["day"])
    out = out.join(last[["value", "day"]].rename(columns={"value": "last", "day": "last_day"}), how="inner")
    out = out[np.isfinite(out["baseline"].to_numpy(dtype=float)) & (out["last_day"] > out["first_day"])]
    out = out.drop(columns="first_day").reset_index()
    out["change"] = out["last"] - out["baseline"]
    base = out["baseline"].to_numpy(dtype=float)
    out["relative"] = np.divide(out["last"].to_numpy(dtype=float), base, out=np.full(len(out), np.nan), where=base > 0)
    return out[cols]


@dataclass(frozen=True)
class ArmComparison:
    """Two-sided Mann-Whitney U of the change from baseline between two arms.

    ``rank_biserial`` = 2 U_a / (n_a n_b) - 1 in [-1, 1]: positive when arm ``a`` tends to have the
    larger change (for POI change: a worse course than ``b``).
    """

    arm_a: str
    arm_b: str
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    u: float
    p_value: float
    rank_biserial: float


def compare_arms(changes: pd.DataFrame) -> list[ArmComparison]:
    """Every pair of arms with at least one patient each (at least 2 each to give a p-value)."""
    result = []
    arms = sorted(a for a in changes["arm"].dropna().unique())
    for a, b in combinations(arms, 2):
        xa = changes.loc[changes.arm == a, "change"].to_numpy(dtype=float)
        xb = changes.loc[changes.arm == b, "change"].to_numpy(dtype=float)
        if len(xa) == 0 or len(xb) == 0:
            continue
        if len(xa) >= 2 and len(xb) >= 2:
            test = stats.mannwhitneyu(xa, xb, alternative="two-sided")
            u, p = float(test.statistic), float(test.pvalue)
        else:
            u, p = float("nan"), float("nan")
        rb = 2.0 * u / (len(xa) * len(xb)) - 1.0 if np.isfinite(u) else float("nan")
        result.append(
            ArmComparison(a, b, len(xa), len(xb), float(np.median(xa)), float(np.median(xb)), u, p, rb)
        )
    return result


def responders(changes: pd.DataFrame, fraction: float = 0.5) -> pd.DataFrame:
    """Patients whose POI at the last follow-up is at most ``fraction`` of the baseline POI.

    Patients with a baseline POI of 0 are not counted (nothing to halve).
    """
    ok = changes[(changes["baseline"] > 0) & (changes["last"] <= fraction * changes["baseline"])]
    return ok.sort_values(["arm", "relative"]).reset_index(drop=True)


def baseline_values(cohort: pd.DataFrame, metric: str = M.SEVERITY, region: str = "whole") -> pd.Series:
    """The first scan's value per patient (index ``patient_key``; NaN where the first scan has
    none, never a later scan's value), e.g. for the baseline-severity filter."""
    dates = cohort.groupby("patient_key")["study_date"].min()
    rows = select(cohort, metric, region)
    first = rows[rows["study_date"].to_numpy() == dates.reindex(rows["patient_key"]).to_numpy()]
    return first.groupby("patient_key")["value"].first().reindex(dates.index)


def filter_cohort(
    cohort: pd.DataFrame,
    arms: list[str] | None = None,
    date_range: tuple[object, object] | None = None,
    baseline_severity: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Cohort rows of the chosen arms, of patients whose baseline (first scan) is dated within
    ``date_range`` (inclusive; e.g. an enrolment period) and whose baseline total severity score
    (0-25) lies in ``baseline_severity``. A chosen patient keeps every scan, so the baseline
    stays the first scan whatever the filters; a patient without a baseline score is left out
    only when a severity range is given."""
    out = cohort
    if arms is not None:
        out = out[out["arm"].isin(arms)]
    if date_range is not None:
        lo, hi = (pd.Timestamp(d) for d in date_range)
        first = cohort.groupby("patient_key")["study_date"].min()
        keep = first[(first >= lo) & (first <= hi)].index
        out = out[out["patient_key"].isin(keep)]
    if baseline_severity is not None:
        base = baseline_values(cohort)
        keep = base[(base >= baseline_severity[0]) & (base <= baseline_severity[1])].index
        out = out[out["patient_key"].isin(keep)]
    return out

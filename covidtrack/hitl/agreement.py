"""Local validation: how far the model's output was from what this site's reviewers accepted.

Every correction keeps the model segmentation it started from, so the store already holds, per
corrected scan, the model's answer and the reviewer's. No inference is needed: this module reads
the two infection masks and the two segmentations' stored metric rows and reports, per scan,

- infection Dice in 3D (GGO and consolidation Dice too; NaN where both masks are empty),
- the whole-lung percentage of infection (POI) of each and its difference (model - reviewer,
  percentage points), and the 0-25 CT severity score of each where lobes exist,
- the voxels the reviewers changed from the model's answer and their minutes on the scan (all
  corrections of it),

and per model version: scan count, mean and median Dice, mean absolute POI difference, the
Bland-Altman bias and 95 % limits of agreement of POI (bias +- 1.96 SD of the differences) and
how often the severity score was the same.

This is the number a team should read before trusting the model on its own scans. It is biased
towards the cases reviewers chose to correct (often the hard ones) and, for scans whose patients
trained a fine-tuned version (:func:`covidtrack.hitl.retrain.scans_seen_by`), it is not unseen
data for that version; the ``held_out`` column marks patients that no fine-tuning run trains on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidtrack.labels import CONSOLIDATION, GGO
from covidtrack.metrics import POI, SEVERITY

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from covidtrack.store import Store

COLUMNS = (
    "scan_id", "patient_key", "alias", "study_date", "model_version", "author", "held_out", "dice", "dice_ggo", "dice_consolidation",
    "poi_model", "poi_reviewer", "poi_difference", "severity_model", "severity_reviewer", "voxels_changed", "minutes",
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom


def _whole(rows: pd.DataFrame, seg_id: str, metric: str) -> float:
    sel = rows[(rows["seg_id"] == seg_id) & (rows["region"] == "whole") & (rows["metric"] == metric)]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def _model_origin(store: "Store", by_seg: dict[str, Any], row: dict[str, Any]) -> Any:
    """The model segmentation a correction goes back to (a correction of a correction is followed
    to the model output the first reviewer started from); ``by_seg``: correction seg id -> the seg
    id it started from."""
    seg_id, seen = row.get("original_seg_id"), set()
    if not seg_id:
        return store.segmentation(row["scan_id"], "model")
    while seg_id in by_seg and seg_id not in seen and by_seg[seg_id]:
        seen.add(seg_id)
        seg_id = by_seg[seg_id]
    return store.segmentation_by_id(seg_id)


def agreement_table(store: "Store", holdout_fraction: float | None = None) -> pd.DataFrame:
    """One row per corrected scan (its latest correction) comparing the model segmentation the
    reviewer started from with the correction; columns :data:`COLUMNS`. Empty when nothing was
    corrected."""
    from covidtrack.hitl import retrain
    from covidtrack.store import read_canonical

    rows = retrain.latest_corrections(store)
    if not rows:
        return pd.DataFrame(columns=list(COLUMNS))
    fraction = retrain.REVIEWED_HOLDOUT if holdout_fraction is None else holdout_fraction
    held = retrain.holdout_patients([r["patient_key"] for r in rows], fraction)
    scans = store.scans().set_index("scan_id")
    metric_rows = store.metrics(model_version=None)
    all_corrections = store.corrections()
    by_seg = all_corrections.set_index("seg_id")["original_seg_id"].to_dict()
    minutes = (all_corrections.groupby("scan_id")["seconds"].sum() / 60.0).to_dict()
    out = []
    for r in rows:
        original = _model_origin(store, by_seg, r)
        model = read_canonical(original.infection_path)[0]
        reviewer = read_canonical(r["mask_path"])[0]
        versions = original.model_versions if isinstance(original.model_versions, dict) else json.loads(original.model_versions)
        poi_m, poi_r = _whole(metric_rows, original.seg_id, POI), _whole(metric_rows, r["seg_id"], POI)
        out.append({
            "scan_id": r["scan_id"], "patient_key": r["patient_key"],
            "alias": scans.loc[r["scan_id"], "alias"] if r["scan_id"] in scans.index else None,
            "study_date": scans.loc[r["scan_id"], "study_date"] if r["scan_id"] in scans.index else None,
            "model_version": versions.get("infection", original.kind), "author": r["author"],
            "held_out": r["patient_key"] in held,
            "dice": _dice(model > 0, reviewer > 0),
            "dice_ggo": _dice(model == GGO, reviewer == GGO),
            "dice_consolidation": _dice(model == CONSOLIDATION, reviewer == CONSOLIDATION),
            "poi_model": poi_m, "poi_reviewer": poi_r, "poi_difference": poi_m - poi_r,
            "severity_model": _whole(metric_rows, original.seg_id, SEVERITY),
            "severity_reviewer": _whole(metric_rows, r["seg_id"], SEVERITY),
            "voxels_changed": int(np.count_nonzero(model != reviewer)),
            "minutes": float(minutes.get(r["scan_id"], 0.0)),
        })
    return pd.DataFrame(out, columns=list(COLUMNS))


def agreement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model version: scans, Dice (mean, median), mean |POI difference|, Bland-Altman bias and
    95 % limits of agreement of POI (needs 2 scans), share of scans with the same severity score."""
    cols = ["model_version", "scans", "dice_mean", "dice_median", "poi_abs_difference_mean", "poi_bias",
            "poi_loa_low", "poi_loa_high", "severity_same_share", "minutes_median"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    out: list[dict[str, Any]] = []
    for version, g in table.groupby("model_version", sort=True):
        diff = g["poi_difference"].dropna().to_numpy(float)
        sd = float(np.std(diff, ddof=1)) if diff.size >= 2 else float("nan")
        bias = float(diff.mean()) if diff.size else float("nan")
        sev = g.dropna(subset=["severity_model", "severity_reviewer"])
        out.append({
            "model_version": version, "scans": len(g),
            "dice_mean": float(g["dice"].mean()), "dice_median": float(g["dice"].median()),
            "poi_abs_difference_mean": float(np.abs(diff).mean()) if diff.size else float("nan"),
            "poi_bias": bias, "poi_loa_low": bias - 1.96 * sd, "poi_loa_high": bias + 1.96 * sd,
            "severity_same_share": float((sev["severity_model"] == sev["severity_reviewer"]).mean()) if len(sev) else float("nan"),
            "minutes_median": float(g["minutes"].median()),
        })
    return pd.DataFrame(out, columns=cols)


def bland_altman_figure(table: pd.DataFrame, height: int = 360) -> "go.Figure":
    """POI of model vs reviewer: difference against mean per corrected scan, one colour per model
    version, with each version's bias and 95 % limits of agreement as lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    summary = agreement_summary(table).set_index("model_version")
    for i, (version, g) in enumerate(table.dropna(subset=["poi_difference"]).groupby("model_version", sort=True)):
        colour = palette[i % len(palette)]
        mean = (g["poi_model"] + g["poi_reviewer"]) / 2
        fig.add_trace(go.Scatter(
            x=mean, y=g["poi_difference"], mode="markers", name=str(version), marker={"color": colour, "size": 9},
            text=[f"{a if isinstance(a, str) and a else k[:8]} {d}" for a, k, d in zip(g["alias"], g["patient_key"], g["study_date"])],
            hovertemplate="%{text}<br>mean POI %{x:.2f} %<br>model - reviewer %{y:+.2f} pp<extra>" + str(version) + "</extra>",
        ))
        s = summary.loc[version]
        for value, dash in ((s["poi_bias"], "solid"), (s["poi_loa_low"], "dot"), (s["poi_loa_high"], "dot")):
            if np.isfinite(value):
                fig.add_hline(y=float(value), line={"color": colour, "dash": dash, "width": 1})
    fig.add_hline(y=0.0, line={"color": "#888", "width": 1})
    fig.update_layout(
        height=height, margin={"l": 60, "r": 20, "t": 40, "b": 50}, template="plotly_white",
        title={"text": "POI: model vs reviewer (Bland-Altman; lines: bias and 95 % limits)", "font": {"size": 14}},
        xaxis_title="mean of model and reviewer POI (%)", yaxis_title="model - reviewer (pp)", legend_title_text="model",
    )
    return fig

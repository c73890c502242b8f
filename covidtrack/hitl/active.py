"""Active learning: which scan should a radiologist review next?

Score = mean predictive entropy (bits, 0..1) of the model's infection probability over the lung
voxels: ``H(p) = -p log2 p - (1 - p) log2 (1 - p)``. A confident model (p near 0 or 1
everywhere) scores near 0; a scan with large areas where the model hesitates (p near 0.5) scores
high, and correcting it teaches the model the most. The mean is over the lungs, not the whole
image, so a scan is not favoured for having more air or body around the chest. (MC-dropout
variance needs a network trained with dropout; the shipped UNet has none, so entropy is used.)

Scores depend on the model version, so they are cached per version in
``$COVIDTRACK_HOME/hitl/scores.json`` (computing one costs a forward pass over the scan).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from covidtrack.config import settings

if TYPE_CHECKING:
    from covidtrack.segment.infection import InfectionModel
    from covidtrack.store import Store

QueueOrder = Literal["score", "date"]
_EPS = 1e-6


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli probability (any shape) -> float32 in [0, 1]."""
    p = np.clip(np.asarray(prob, dtype=np.float32), _EPS, 1.0 - _EPS)
    return (-(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))).astype(np.float32)


def entropy_score(prob: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean predictive entropy (bits) of ``prob`` over ``region`` (e.g. the lungs; None = all).

    A region without voxels scores 0 (nothing to review there).
    """
    ent = binary_entropy(prob)
    if region is not None:
        if region.shape != ent.shape:
            raise ValueError(f"region {region.shape} and probability {ent.shape} differ in shape")
        sel = ent[region.astype(bool)]
        return float(sel.mean()) if sel.size else 0.0
    return float(ent.mean())


def rank(scores: dict[str, float]) -> list[str]:
    """Item names, most uncertain first (ties: by name, so the order is reproducible)."""
    return sorted(scores, key=lambda k: (-scores[k], k))


# --- scores of stored scans --------------------------------------------------------------------
def _cache_path() -> Path:
    return settings().home / "hitl" / "scores.json"


def cached_scores(model_version: str) -> dict[str, float]:
    """``{scan_id: score}`` computed earlier with ``model_version`` (e.g. ``infection/v2``)."""
    p = _cache_path()
    data = json.loads(p.read_text()) if p.exists() else {}
    return {k: float(v) for k, v in data.get(model_version, {}).items()}


def _save_scores(model_version: str, scores: dict[str, float]) -> None:
    p = _cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(p.read_text()) if p.exists() else {}
    data.setdefault(model_version, {}).update(scores)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".scores.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, p)  # atomic: the UI may read it at any moment


def score_scan(store: "Store", scan_id: str, model: "InfectionModel") -> float:
    """Entropy score of one stored scan under ``model`` (inside the lungs of its model segmentation)."""
    from covidtrack.store import read_canonical

    rec = store.segmentation(scan_id, "model")
    volume = store.load_volume(scan_id)
    lungs = read_canonical(rec.lungs_path)[0] > 0
    _, prob = model.predict(volume.array, lungs.astype(np.uint8), volume.spacing)
    return entropy_score(prob, lungs)


def score_scans(
    store: "Store",
    scan_ids: Sequence[str],
    model: "InfectionModel | None" = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Score the scans not yet scored with the model (default: the active one); cached per version."""
    if model is None:
        from covidtrack.segment.infection import InfectionModel

        model = InfectionModel.load()
    done = cached_scores(model.version)
    todo = [s for s in scan_ids if s not in done]
    new: dict[str, float] = {}
    for i, sid in enumerate(todo):
        new[sid] = score_scan(store, sid, model)
        _save_scores(model.version, {sid: new[sid]})  # saved one by one: an interrupted run keeps its work
        if progress is not None:
            progress(i + 1, len(todo), sid)
    return {**done, **new}


def review_queue(store: "Store", order: QueueOrder = "score", model_version: str | None = None, include_reviewed: bool = False) -> pd.DataFrame:
    """Scans to review: scan_id, patient_key, alias, study_date, score, reviewed, n_corrections.

    ``order="score"``: highest entropy score first (unscored scans last, then by date);
    ``order="date"``: oldest study first. Reviewed scans (with a correction) are left out unless
    ``include_reviewed``. Scores are those cached for ``model_version`` (default: the active
    infection model); see :func:`score_scans`.
    """
    if order not in ("score", "date"):
        raise ValueError(f"queue order must be 'score' or 'date', got {order!r}")
    if model_version is None:
        from covidtrack import modelstore
        from covidtrack.errors import ModelError

        try:
            model_version = modelstore.active("infection").name
        except ModelError:
            model_version = ""
    scans = store.scans()
    cols = ["scan_id", "patient_key", "alias", "study_date", "score", "reviewed", "n_corrections"]
    if scans.empty:
        return pd.DataFrame(columns=cols)
    corr = store.corrections()
    n_corr = corr.groupby("scan_id").size() if len(corr) else pd.Series(dtype=int)
    scores = cached_scores(model_version) if model_version else {}
    out = pd.DataFrame(
        {
            "scan_id": scans["scan_id"],
            "patient_key": scans["patient_key"],
            "alias": scans["alias"],
            "study_date": pd.to_datetime(scans["study_date"]).dt.date,
            "score": [scores.get(s, np.nan) for s in scans["scan_id"]],
            "n_corrections": [int(n_corr.get(s, 0)) for s in scans["scan_id"]],
        }
    )
    out["reviewed"] = out["n_corrections"] > 0
    if not include_reviewed:
        out = out[~out["reviewed"]]
    if order == "score":
        out = out.sort_values(["score", "study_date", "scan_id"], ascending=[False, True, True], na_position="last")
    else:
        out = out.sort_values(["study_date", "scan_id"])
    return out[cols].reset_index(drop=True)

"""``python -m covidtrack evaluate phantoms --n N [--json OUT]``: accuracy against exact phantom truth.

For each phantom (seeds ``--first-seed`` ... ``+N-1``, disjoint from the seeds the lung model
trained on: 1000+ for training, 500+ for its validation) it runs :func:`covidtrack.segment.segment`
and reports:

- lung Dice (both lungs together) and per side (right / left);
- infection Dice (GGO + consolidation together, any label) and per class;
- whole-lung POI (percentage of infection = infected lung volume / lung volume x 100, %) of the
  prediction and of the truth, and their difference in percentage points (pp);
- that difference split into parts that add up to it (:func:`poi_error_parts`): true infection
  the model misses inside the predicted lung mask, true infection outside the predicted lung
  mask, false-positive infection, and the effect of the predicted lung volume;
- the share of true GGO found per HU band (faint ground glass is what the model misses most).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covidtrack.labels import CONSOLIDATION, GGO, LEFT_LUNG, RIGHT_LUNG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=5, help="number of phantoms (default 5)")
    parser.add_argument("--first-seed", type=int, default=2000, help="seed of the first phantom (default 2000)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")


@dataclass(frozen=True)
class PhantomScore:
    """Scores of one phantom. Dice in [0, 1] (NaN when both masks are empty); POI in %; error in pp."""

    seed: int
    shape: tuple[int, int, int]
    lung_dice: float
    right_dice: float
    left_dice: float
    infection_dice: float
    ggo_dice: float
    consolidation_dice: float
    poi_truth_pct: float
    poi_pred_pct: float
    poi_error_pp: float
    poi_error_parts_pp: dict[str, float]
    ggo_found_by_hu: dict[str, float]  # share of true GGO voxels called infected, per HU band
    seconds: float


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to find, nothing found)."""
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def poi_pct(lungs: np.ndarray, infection: np.ndarray) -> float:
    """Percentage of the lung volume that is infected (%), the metrics module's definition."""
    lung = lungs > 0
    n = int(lung.sum())
    return float("nan") if n == 0 else 100.0 * int((lung & (infection > 0)).sum()) / n


def poi_error_parts(lungs: np.ndarray, infection: np.ndarray, truth_lungs: np.ndarray, truth_inf: np.ndarray) -> dict[str, float]:
    """The POI error (pp) as a sum of four parts.

    With predicted lung L, true lung L*, true infection I* (inside L*) and predicted infection I
    (inside L): POI - POI* = -missed_inside/L - outside_lung/L + false_positive/L + (I*/L - I*/L*),
    where ``missed_inside`` is I* inside L but not in I, ``outside_lung`` is I* outside L and
    ``false_positive`` is I outside I*. NaN parts when a lung mask is empty.
    """
    lung, tlung = lungs > 0, truth_lungs > 0
    inf, tinf = (infection > 0) & lung, (truth_inf > 0) & tlung
    n, nt = int(lung.sum()), int(tlung.sum())
    if n == 0 or nt == 0:
        return {k: float("nan") for k in ("missed_inside_lung", "outside_lung_mask", "false_positive", "lung_volume")}
    n_true = int(tinf.sum())
    return {
        "missed_inside_lung": -100.0 * int((tinf & lung & ~inf).sum()) / n,
        "outside_lung_mask": -100.0 * int((tinf & ~lung).sum()) / n,
        "false_positive": 100.0 * int((inf & ~tinf).sum()) / n,
        "lung_volume": 100.0 * (n_true / n - n_true / nt),
    }


#: HU bands for :func:`found_by_hu` (the phantoms' ground glass spans -750 to -300 HU, faintest first).
HU_BANDS = ((-1100.0, -750.0), (-750.0, -650.0), (-650.0, -550.0), (-550.0, -450.0), (-450.0, -300.0), (-300.0, 3000.0))


def found_by_hu(hu: np.ndarray | None, infection: np.ndarray, truth_inf: np.ndarray) -> dict[str, float]:
    """Share of the true GGO voxels that the prediction calls infected, per HU band (NaN if empty)."""
    if hu is None:
        return {}
    ggo, found = truth_inf == GGO, infection > 0
    out = {}
    for lo, hi in HU_BANDS:
        band = ggo & (hu >= lo) & (hu < hi)
        n = int(band.sum())
        out[f"[{lo:.0f},{hi:.0f})"] = float("nan") if n == 0 else int((band & found).sum()) / n
    return out


def score(seed: int, lungs: np.ndarray, infection: np.ndarray, truth_lungs: np.ndarray, truth_inf: np.ndarray, seconds: float,
          hu: np.ndarray | None = None) -> PhantomScore:
    truth_poi = poi_pct(truth_lungs, truth_inf)
    pred_poi = poi_pct(lungs, infection)
    return PhantomScore(
        seed=seed,
        shape=tuple(int(s) for s in lungs.shape),  # type: ignore[arg-type]
        lung_dice=dice(lungs > 0, truth_lungs > 0),
        right_dice=dice(lungs == RIGHT_LUNG, truth_lungs == RIGHT_LUNG),
        left_dice=dice(lungs == LEFT_LUNG, truth_lungs == LEFT_LUNG),
        infection_dice=dice(infection > 0, truth_inf > 0),
        ggo_dice=dice(infection == GGO, truth_inf == GGO),
        consolidation_dice=dice(infection == CONSOLIDATION, truth_inf == CONSOLIDATION),
        poi_truth_pct=truth_poi,
        poi_pred_pct=pred_poi,
        poi_error_pp=pred_poi - truth_poi,
        poi_error_parts_pp=poi_error_parts(lungs, infection, truth_lungs, truth_inf),
        ggo_found_by_hu=found_by_hu(hu, infection, truth_inf),
        seconds=seconds,
    )


def evaluate(n: int, first_seed: int = 2000, log=print) -> dict:
    """Segment ``n`` phantoms and score them; returns per-phantom rows and a summary."""
    from covidtrack.phantom import make_phantom  # type: ignore[attr-defined]
    from covidtrack.segment.api import segment

    rows: list[PhantomScore] = []
    versions: dict[str, str] = {}
    for seed in range(first_seed, first_seed + n):
        volume, truth = make_phantom(seed)
        t = time.perf_counter()
        seg = segment(volume, lobes=False)
        row = score(seed, seg.lungs, seg.infection, truth.lungs, truth.infection, time.perf_counter() - t, hu=volume.array)
        versions = seg.model_versions
        rows.append(row)
        log(f"phantom {seed} {row.shape}: lung Dice {row.lung_dice:.4f} (R {row.right_dice:.4f}, L {row.left_dice:.4f}), "
            f"infection Dice {row.infection_dice:.4f}, POI truth {row.poi_truth_pct:.2f} % pred {row.poi_pred_pct:.2f} % "
            f"(error {row.poi_error_pp:+.2f} pp: " + ", ".join(f"{k.replace('_', ' ')} {v:+.2f}" for k, v in row.poi_error_parts_pp.items())
            + f"), {row.seconds:.1f} s")

    def stat(name: str) -> dict:
        vals = np.array([getattr(r, name) for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return {"mean": None, "min": None, "max": None}
        return {"mean": round(float(vals.mean()), 4), "min": round(float(vals.min()), 4), "max": round(float(vals.max()), 4)}

    abs_err = [abs(r.poi_error_pp) for r in rows if np.isfinite(r.poi_error_pp)]
    summary = {name: stat(name) for name in ("lung_dice", "right_dice", "left_dice", "infection_dice", "ggo_dice", "consolidation_dice")}
    summary["poi_abs_error_pp"] = {"mean": round(float(np.mean(abs_err)), 3) if abs_err else None,
                                   "max": round(float(np.max(abs_err)), 3) if abs_err else None}
    return {
        "what": "segment() on synthetic phantoms vs their exact truth (covidtrack.phantom)",
        "hardware": hardware(),
        "seeds": [first_seed, first_seed + n - 1],
        "model_versions": versions,
        "summary": summary,
        "phantoms": [asdict(r) for r in rows],
    }


def hardware() -> dict:
    """Where the numbers were measured (timings in ``seconds`` depend on it)."""
    import os
    import platform

    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "note": "2 CPU cores, shared with other jobs while measured"}


def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.n, args.first_seed)
    s = result["summary"]
    print(f"mean lung Dice {s['lung_dice']['mean']}, infection Dice {s['infection_dice']['mean']}, "
          f"mean |POI error| {s['poi_abs_error_pp']['mean']} pp (models {result['model_versions']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

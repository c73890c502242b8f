"""Quantification of one segmented scan: pure functions, no I/O.

:func:`scan_metrics` turns a :class:`~covidtrack.volume.Volume` and its
:class:`~covidtrack.segment.types.Segmentation` into long rows ``(region, metric, value, unit)``.

Conventions (documented once, tested in ``tests/test_metrics.py``):

- Volumes are voxel counts times the scan's own voxel volume (``Volume.voxel_volume_ml``, from its
  spacing in mm). Masks live on the scan's canonical grid, which is a lossless permutation of the
  source grid, so no resampling error reaches the numbers.
- Infection only counts inside the lung mask (a label outside the lungs is a segmentation slip,
  not disease). Lobe regions are ``lobes == k`` inside the lung mask, so lobes add up to ``whole``
  when the lobe map covers the lungs.
- POI (percentage of infection) = infection volume / lung volume x 100 (%), also for GGO and
  consolidation separately. An empty region gives NaN, never a division error.
- HU density classes of infected voxels, half-open bins in HU, see :data:`DENSITY_BINS`:
  ``< -750``, ``[-750, -500)``, ``[-500, -300)``, ``[-300, 0)``, ``>= 0``. The five bins cover every
  HU value, so they add up to the infection volume.
- CT severity score (Pan et al., Radiology 2020) per lobe from the involved fraction:
  0 none, 1 < 5 %, 2 5-25 %, 3 > 25 % and < 50 %, 4 50-75 %, 5 > 75 %; total = sum over the five
  lobes (0-25). Boundaries are computed from voxel counts in integer arithmetic, so exactly 5 %
  scores 2, exactly 25 % scores 2, exactly 50 % scores 4 and exactly 75 % scores 4. Severity rows
  exist only when lobes were segmented; a lobe missing from the lobe map (e.g. an imported map
  without a middle lobe) has a missing score (NaN), and so has the total.
- Lesions: 3D connected components of infection (26-connectivity) with a volume of at least
  :data:`MIN_LESION_ML` (0.1 mL, roughly a 6 mm sphere: smaller specks are usually noise of the
  voxel classifier). Reported as ``lesion_count`` and ``largest_lesion_volume`` (mL).
- Quality flags (value 1.0 = raised, 0.0 = not), region ``whole`` unless stated:
  ``flag_incomplete_coverage`` lung voxels on the first or last axial slice, or more than
  :data:`EDGE_LUNG_ML` of lung on the in-plane border of the image (a reconstruction field of
  view that cuts the lateral lung, where COVID-19 opacities concentrate);
  ``flag_thick_slices`` slice spacing or recorded slice thickness above 5 mm;
  ``flag_coarse_pixels`` in-plane pixels above 3 mm (the infection model calls blur ground glass:
  a healthy phantom gets ~0 % POI at 1.4 mm, 0.3 % at 2.7 mm, ~4.5 % at 4.3 mm);
  ``flag_lung_volume_range`` total lung volume outside 1.5-9 L;
  ``flag_small_lung_high_infection`` per lung side / lobe (and on ``whole`` if any): POI above
  50 % in a region whose lung mask is implausibly small (:data:`SMALL_REGION_ML`), the typical
  failure where a dense consolidation was left out of the lung mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd
from scipy import ndimage

from covidtrack.labels import CONSOLIDATION, GGO, LEFT_LUNG, LOBE_LABELS, RIGHT_LUNG
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

COLUMNS = ("region", "metric", "value", "unit")

# Metric names (the store, dashboard and export use these strings).
LUNG_VOLUME = "lung_volume"
INFECTION_VOLUME = "infection_volume"
GGO_VOLUME = "ggo_volume"
CONSOLIDATION_VOLUME = "consolidation_volume"
POI = "poi"
GGO_POI = "ggo_poi"
CONSOLIDATION_POI = "consolidation_poi"
INFECTION_MEAN_HU = "infection_mean_hu"
SEVERITY = "severity_score"
LESION_COUNT = "lesion_count"
LARGEST_LESION = "largest_lesion_volume"
FLAG_COVERAGE = "flag_incomplete_coverage"
FLAG_THICK = "flag_thick_slices"
FLAG_COARSE = "flag_coarse_pixels"
FLAG_LUNG_RANGE = "flag_lung_volume_range"
FLAG_SMALL_LUNG = "flag_small_lung_high_infection"
FLAG_IDENTITY = "flag_identity_mismatch"
FLAG_ASYMMETRY = "flag_lung_asymmetry"
SLICE_MM = "slice_thickness_mm"  # max(slice spacing, nominal thickness): what the scan can resolve along z
PIXEL_MM = "pixel_spacing_mm"  # the coarser in-plane pixel side


@dataclass(frozen=True)
class DensityBin:
    """Half-open HU interval ``[low, high)`` of infected voxels; ``None`` = unbounded."""

    metric: str
    low: float | None
    high: float | None


DENSITY_BINS: tuple[DensityBin, ...] = (
    DensityBin("infection_volume_hu_lt_m750", None, -750),
    DensityBin("infection_volume_hu_m750_m500", -750, -500),
    DensityBin("infection_volume_hu_m500_m300", -500, -300),
    DensityBin("infection_volume_hu_m300_0", -300, 0),
    DensityBin("infection_volume_hu_ge_0", 0, None),
)

UNITS: dict[str, str] = {
    LUNG_VOLUME: "mL",
    INFECTION_VOLUME: "mL",
    GGO_VOLUME: "mL",
    CONSOLIDATION_VOLUME: "mL",
    POI: "%",
    GGO_POI: "%",
    CONSOLIDATION_POI: "%",
    INFECTION_MEAN_HU: "HU",
    SEVERITY: "score",
    LESION_COUNT: "count",
    LARGEST_LESION: "mL",
    FLAG_COVERAGE: "flag",
    FLAG_THICK: "flag",
    FLAG_COARSE: "flag",
    FLAG_LUNG_RANGE: "flag",
    FLAG_SMALL_LUNG: "flag",
    FLAG_IDENTITY: "flag",
    FLAG_ASYMMETRY: "flag",
    SLICE_MM: "mm",
    PIXEL_MM: "mm",
    **{b.metric: "mL" for b in DENSITY_BINS},
}

MIN_SIDE_RATIO = 0.55  # smaller / larger lung volume below which a lung (or lobe) may be missing from the mask
MIN_LESION_ML = 0.1  # smallest connected infection component counted as a lesion (mL)
MAX_SLICE_MM = 5.0  # thicker slices blur GGO into the lung (partial volume)
MAX_PIXEL_MM = 3.0  # coarser in-plane pixels: blur looks like GGO to the infection model
LUNG_RANGE_ML = (1500.0, 9000.0)  # plausible adult total lung volume (mL)
HIGH_POI_PCT = 50.0  # "very high infection" for the small-lung flag (%)
EDGE_LUNG_ML = 0.1  # lung on the in-plane image border beyond this: the field of view cuts the lungs
SMALL_REGION_ML = {"side": 500.0, "lobe": 150.0}  # implausibly small lung / lobe masks (mL)

# Pan et al. thresholds as exact fractions of the lobe (integer arithmetic, no float boundary slop)
_SEVERITY_EDGES = (Fraction(5, 100), Fraction(25, 100), Fraction(50, 100), Fraction(75, 100))


def severity_from_counts(infected_voxels: int, lobe_voxels: int) -> int:
    """CT severity score 0-5 of one lobe from voxel counts (Pan et al., Radiology 2020).

    0 no involvement; 1 < 5 %; 2 5-25 %; 3 > 25 % and < 50 %; 4 50-75 %; 5 > 75 %.
    An empty lobe scores 0.
    """
    if infected_voxels <= 0 or lobe_voxels <= 0:
        return 0
    frac = Fraction(int(infected_voxels), int(lobe_voxels))
    five, twenty_five, fifty, seventy_five = _SEVERITY_EDGES
    if frac < five:
        return 1
    if frac <= twenty_five:
        return 2
    if frac < fifty:
        return 3
    if frac <= seventy_five:
        return 4
    return 5


def severity_from_percent(poi_pct: float) -> int:
    """The same score from a percentage (0-100 %); prefer :func:`severity_from_counts` for masks."""
    if not np.isfinite(poi_pct) or poi_pct <= 0:
        return 0
    # The decimal the caller wrote, as an exact fraction (5.0 -> exactly 5 %, not 4.9999...).
    frac = Fraction(str(float(poi_pct))) / 100
    return severity_from_counts(frac.numerator, frac.denominator)


def lesion_volumes_ml(infected: np.ndarray, voxel_ml: float, min_ml: float = MIN_LESION_ML) -> np.ndarray:
    """Volumes (mL, descending) of 26-connected infection components of at least ``min_ml`` mL."""
    if not infected.any():
        return np.zeros(0)
    labels, n = ndimage.label(infected, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
    return np.sort(sizes[sizes >= min_ml])[::-1]


def _region_masks(seg: Segmentation) -> Iterable[tuple[str, str, np.ndarray]]:
    """(region, kind, mask) for whole, sides and (if present) lobes; kind in whole/side/lobe."""
    lungs = seg.lungs > 0
    yield "whole", "whole", lungs
    yield "right", "side", seg.lungs == RIGHT_LUNG
    yield "left", "side", seg.lungs == LEFT_LUNG
    if seg.lobes is not None:
        for lab, name in LOBE_LABELS.items():
            yield name, "lobe", (seg.lobes == lab) & lungs


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else float("nan")


def scan_metrics(volume: Volume, segmentation: Segmentation) -> pd.DataFrame:
    """All metrics of one scan as long rows ``region, metric, value, unit`` (see module doc)."""
    if segmentation.shape != volume.shape:
        raise ValueError(f"segmentation shape {segmentation.shape} differs from volume shape {volume.shape}")
    voxel_ml = volume.voxel_volume_ml
    hu = volume.array
    lungs = segmentation.lungs > 0
    infection = np.where(lungs, segmentation.infection, 0)
    ggo, cons = infection == GGO, infection == CONSOLIDATION
    infected = infection > 0

    rows: list[tuple[str, str, float]] = []
    small_flags: list[float] = []
    severities: list[float] = []
    for region, kind, mask in _region_masks(segmentation):
        n_lung = int(np.count_nonzero(mask))
        n_ggo = int(np.count_nonzero(ggo & mask))
        n_cons = int(np.count_nonzero(cons & mask))
        n_inf = n_ggo + n_cons
        inf_hu = hu[infected & mask]
        rows += [
            (region, LUNG_VOLUME, n_lung * voxel_ml),
            (region, INFECTION_VOLUME, n_inf * voxel_ml),
            (region, GGO_VOLUME, n_ggo * voxel_ml),
            (region, CONSOLIDATION_VOLUME, n_cons * voxel_ml),
            (region, POI, _pct(n_inf, n_lung)),
            (region, GGO_POI, _pct(n_ggo, n_lung)),
            (region, CONSOLIDATION_POI, _pct(n_cons, n_lung)),
            (region, INFECTION_MEAN_HU, float(inf_hu.mean(dtype=np.float64)) if inf_hu.size else float("nan")),
        ]
        for b in DENSITY_BINS:
            sel = np.ones(inf_hu.shape, dtype=bool)
            if b.low is not None:
                sel &= inf_hu >= b.low
            if b.high is not None:
                sel &= inf_hu < b.high
            rows.append((region, b.metric, int(np.count_nonzero(sel)) * voxel_ml))
        if kind == "lobe":
            # a lobe missing from the lobe map is "not measured", not "no involvement": its score
            # and the 0-25 total are missing rather than silently counted as 0
            score = float(severity_from_counts(n_inf, n_lung)) if n_lung > 0 else float("nan")
            severities.append(score)
            rows.append((region, SEVERITY, score))
        if kind in ("side", "lobe"):
            small = n_lung * voxel_ml < SMALL_REGION_ML[kind] and _pct(n_inf, n_lung) > HIGH_POI_PCT
            small_flags.append(float(small))
            rows.append((region, FLAG_SMALL_LUNG, float(small)))

    if segmentation.lobes is not None:
        rows.append(("whole", SEVERITY, float(sum(severities))))  # NaN when a lobe is missing
    lesions = lesion_volumes_ml(infected, voxel_ml)
    rows.append(("whole", LESION_COUNT, float(lesions.size)))
    rows.append(("whole", LARGEST_LESION, float(lesions[0]) if lesions.size else 0.0))
    rows += [(("whole", name, value)) for name, value in quality_flags(volume, segmentation).items()]
    # the acquisition's resolution, so a trajectory can tell when dates were measured differently
    rows.append(("whole", SLICE_MM, float(max(volume.spacing[0], volume.meta.slice_thickness_mm or 0.0))))
    rows.append(("whole", PIXEL_MM, float(max(volume.spacing[1], volume.spacing[2]))))
    rows.append(("whole", FLAG_SMALL_LUNG, float(max(small_flags, default=0.0))))

    df = pd.DataFrame(rows, columns=["region", "metric", "value"])
    df["value"] = df["value"].astype("float64")
    df["unit"] = df["metric"].map(UNITS)
    return df[list(COLUMNS)]


def quality_flags(volume: Volume, segmentation: Segmentation) -> dict[str, float]:
    """Scan-level flags (1.0 raised, 0.0 not): coverage, slice thickness, in-plane pixel size,
    lung volume range, identity (the scan was accepted although its DICOM identity differs)."""
    lungs = segmentation.lungs > 0
    border = sum(int(np.count_nonzero(edge)) for edge in (lungs[:, 0], lungs[:, -1], lungs[:, :, 0], lungs[:, :, -1]))
    cut = bool(lungs[0].any() or lungs[-1].any()) or border * volume.voxel_volume_ml > EDGE_LUNG_ML
    thickness = max(volume.spacing[0], volume.meta.slice_thickness_mm or 0.0)
    lung_ml = int(np.count_nonzero(lungs)) * volume.voxel_volume_ml
    low, high = LUNG_RANGE_ML
    return {
        FLAG_COVERAGE: float(cut),
        FLAG_THICK: float(thickness > MAX_SLICE_MM),
        FLAG_COARSE: float(max(volume.spacing[1], volume.spacing[2]) > MAX_PIXEL_MM),
        FLAG_LUNG_RANGE: float(not (low <= lung_ml <= high)),
        FLAG_IDENTITY: float(bool(volume.meta.identity_note)),
        FLAG_ASYMMETRY: float(_side_ratio(segmentation.lungs) < MIN_SIDE_RATIO),
    }


def _side_ratio(lungs: np.ndarray) -> float:
    """Smaller over larger lung volume (0 when a side is missing; 1 without lungs)."""
    right, left = int(np.count_nonzero(lungs == RIGHT_LUNG)), int(np.count_nonzero(lungs == LEFT_LUNG))
    return 1.0 if max(right, left) == 0 else min(right, left) / max(right, left)


def wide(df: pd.DataFrame) -> pd.Series:
    """One scan's long rows as a Series indexed ``<region>_<metric>`` (for tables and export)."""
    return pd.Series(df["value"].to_numpy(), index=[f"{r}_{m}" for r, m in zip(df["region"], df["metric"])])

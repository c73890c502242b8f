"""COVID-19-like pneumonia in the body frame: lesions and their course over days.

Lesions are multifocal, mostly subpleural, lower-lobe and posterior predominant, as in the
typical CT pattern (Pan et al., Radiology 2020; Bernheim et al., Radiology 2020). Each lesion
has its own onset, peak (patient peak around day 9-13 after the baseline scan, jittered per lobe)
and resolution half-life; the strength of a lesion sets its ground-glass (GGO) extent and, near
the peak, a consolidation core. A lesion is a smooth blob modulated by a static texture field,
so borders are irregular and GGO is inhomogeneous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from covidtrack.labels import LOBE_LABELS
from covidtrack.phantom.grid import Grid, upsample

GGO_THRESHOLD = 0.35  # lesion strength where ground glass begins
CONSOLIDATION_THRESHOLD = 1.0  # ... and where it turns into consolidation
HU_GGO_RANGE = (-750.0, -300.0)
HU_CONSOLIDATION_RANGE = (-100.0, 50.0)
HU_NORMAL_LUNG = -850.0
# how many lesions (relative) each lobe attracts: lower lobes are hit most
LOBE_WEIGHT: dict[int, float] = {1: 0.8, 2: 0.9, 3: 2.6, 4: 0.9, 5: 2.4}


@dataclass(frozen=True)
class Lesion:
    """One focus of pneumonia. Lengths in mm (anatomical coordinates), times in days since baseline."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]  # (z, y, x) semi-axes at full size
    strength: float  # peak strength (GGO from 0.35, consolidation from 1.0)
    onset_day: float
    peak_day: float
    half_life_days: float  # of the resolution after the peak
    lobe: int

    def activity(self, day: float) -> float:
        """Relative strength in [0, 1] on ``day``: rise from onset to peak, then exponential resolution."""
        if day <= self.onset_day:
            return 0.0
        if day <= self.peak_day:
            t = (day - self.onset_day) / max(self.peak_day - self.onset_day, 1e-6)
            return float(1.0 - (1.0 - t) ** 2)  # fast early growth, levelling off at the peak
        return float(0.5 ** ((day - self.peak_day) / self.half_life_days))


@dataclass(frozen=True)
class DiseaseCourse:
    """All lesions of one patient, and the patient-level peak day (days since baseline)."""

    lesions: tuple[Lesion, ...]
    peak_day: float
    resolution_rate: float


def sample_course(
    lobes: np.ndarray,
    pleura_mm: np.ndarray,
    factor: tuple[int, int, int],
    grid: Grid,
    rng: np.random.Generator,
    severity: float,
    resolution_rate: float = 1.0,
    scale: float = 1.0,
    peak_day: float | None = None,
) -> DiseaseCourse:
    """Draw lesions for a patient with ``severity`` in [0, 1] (0 = healthy).

    ``resolution_rate`` > 1 makes every lesion resolve faster (e.g. an effective treatment).
    ``peak_day`` fixes the patient's peak (default: drawn from 9-13 days).
    """
    drawn = float(rng.uniform(9.0, 13.0))  # always drawn, so the rest of the stream is unchanged
    peak = drawn if peak_day is None else float(peak_day)
    if severity <= 0.0:
        return DiseaseCourse((), peak, resolution_rate)
    n = int(round(3 + 13 * severity))
    coarse_lobes = lobes[:: factor[0], :: factor[1], :: factor[2]]
    cand = np.argwhere(coarse_lobes > 0)
    lob = coarse_lobes[tuple(cand.T)]
    depth = pleura_mm[tuple(cand.T)]
    posterior = cand[:, 1] / max(coarse_lobes.shape[1] - 1, 1)
    # peripheral (subpleural) and dependent foci are the typical COVID-19 pattern
    w = np.vectorize(LOBE_WEIGHT.get)(lob) * np.exp(-depth / 12.0) * (0.6 + posterior)
    w = w / w.sum()
    lobe_shift = {lab: rng.normal(0.0, 1.2) for lab in LOBE_LABELS}  # lobes differ in timing
    lesions = []
    for k in range(n):
        i = rng.choice(len(cand), p=w)
        centre = grid.to_mm(cand[i] * np.array(factor) + rng.uniform(-0.5, 0.5, 3) * np.array(factor))
        size = rng.uniform(9.0, 26.0) * scale * (0.8 + 0.4 * severity)
        radii = size * rng.uniform(0.7, 1.3, 3)
        pleural = k < max(1, n // 5)  # a few dense foci abutting the pleura
        strength = rng.uniform(1.15, 1.7) if pleural else rng.uniform(0.6, 1.45) * (0.75 + 0.35 * severity)
        if pleural:
            radii = radii * 1.2
        lab = int(lob[i])
        peak_k = float(np.clip(peak + lobe_shift[lab] + rng.normal(0.0, 1.0), 6.0, 16.0))
        onset = peak_k - rng.uniform(8.0, 16.0)  # most foci began before the first scan
        lesions.append(
            Lesion(
                centre=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                radii=tuple(float(r) for r in radii),  # type: ignore[arg-type]
                strength=float(strength),
                onset_day=float(onset),
                peak_day=peak_k,
                half_life_days=float(rng.uniform(6.0, 10.0) / resolution_rate),
                lobe=lab,
            )
        )
    return DiseaseCourse(tuple(lesions), peak, resolution_rate)


def texture_field(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """Static smooth noise in about [-1, 1] (float32, full grid): lesion texture, fixed to tissue."""
    factor = tuple(max(1, int(round(3.0 / s))) for s in grid.spacing)
    small_shape = tuple(-(-n // f) for n, f in zip(grid.shape, factor))
    noise = rng.standard_normal(small_shape).astype(np.float32)
    noise = ndi.gaussian_filter(noise, 1.0)
    noise /= max(float(noise.std()), 1e-6) * 2.5
    return upsample(noise[..., None], grid.shape, stride=factor)[..., 0]


def strength_field(course: DiseaseCourse, day: float, grid: Grid, texture: np.ndarray, periphery: np.ndarray) -> np.ndarray:
    """Lesion strength (float32, full grid) on ``day``; thresholds turn it into GGO / consolidation.

    ``periphery`` (see :func:`periphery_field`) lets lesions spread along the pleura rather
    than as round balls, the subpleural pattern of COVID-19 pneumonia.
    """
    out = np.zeros(grid.shape, dtype=np.float32)
    for les in course.lesions:
        act = les.activity(day)
        if act <= 0.02:
            continue
        size = 0.55 + 0.45 * act  # lesions grow while they mature and shrink while they heal
        radii = np.array(les.radii) * size
        c = grid.to_index(np.array(les.centre))
        ext = 2.5 * radii / np.array(grid.spacing)
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, grid.shape)
        if np.any(hi <= lo):
            continue
        axes = [(np.arange(lo[i], hi[i]) - c[i]) * grid.spacing[i] / radii[i] for i in range(3)]
        d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        sl = tuple(slice(lo[i], hi[i]) for i in range(3))
        out[sl] += (les.strength * act * np.exp(-0.5 * d2)).astype(np.float32)
    # texture makes borders irregular and GGO patchy; it moves with the tissue (body frame)
    out *= (1.0 + 0.45 * texture) * periphery
    return out


def periphery_field(pleura_mm: np.ndarray, factor: tuple[int, int, int], grid: Grid) -> np.ndarray:
    """Full-grid weight in about [0.3, 1.25]: high within ~12 mm of the pleura, low centrally.

    ``pleura_mm`` is the distance to the lung surface sampled as ``full[::factor]``.
    """
    w = (0.3 + 0.95 * np.exp(-pleura_mm / 12.0)).astype(np.float32)
    return upsample(w[..., None], grid.shape, stride=factor)[..., 0]


def apply_disease(
    hu: np.ndarray, lobes: np.ndarray, strength: np.ndarray, texture: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Infect the lungs of a body-frame HU map. Returns (new HU, infection labels).

    GGO raises the parenchyma to -750..-300 HU and leaves vessels visible; consolidation
    replaces everything with -100..+50 HU. Labels are set exactly where this happened (every
    voxel with density below soft tissue changes; vessels at blood density inside GGO keep
    their HU and carry the GGO label, as radiologists draw it).
    """
    lung = lobes > 0
    ggo = lung & (strength >= GGO_THRESHOLD)
    cons = ggo & (strength >= CONSOLIDATION_THRESHOLD)
    infection = np.zeros(hu.shape, dtype=np.uint8)
    infection[ggo] = 1
    infection[cons] = 2
    hu = hu.copy()
    s_g = strength[ggo]
    lo, hi = HU_GGO_RANGE
    t = np.clip((s_g - GGO_THRESHOLD) / (CONSOLIDATION_THRESHOLD - GGO_THRESHOLD), 0.0, 1.0)
    tex = texture[ggo]
    # crazy paving: thin denser lines (thickened septa) where the texture field crosses zero,
    # more marked in the denser, more mature parts of a lesion
    septa = np.exp(-((tex / 0.06) ** 2)) * t
    ggo_hu = np.clip(lo + (hi - lo) * (0.15 + 0.75 * t) + 60.0 * tex + 140.0 * septa, lo, hi)
    # Ground glass adds density to whatever is there: normal parenchyma (-850 HU) is raised
    # to ggo_hu, denser structures less (fissures still visibly denser, vessels unchanged).
    old = hu[ggo]
    delta = (ggo_hu - HU_NORMAL_LUNG) * np.clip(1.0 - (old - HU_NORMAL_LUNG) / (40.0 - HU_NORMAL_LUNG), 0.0, None)
    hu[ggo] = old + delta
    clo, chi = HU_CONSOLIDATION_RANGE
    hu[cons] = np.clip(-50.0 + 40.0 * texture[cons] + 20.0 * np.clip(strength[cons] - 1.0, 0, 2), clo, chi)
    return hu, infection

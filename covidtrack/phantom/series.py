"""Assembling scans: body-frame anatomy + disease on a day -> pose/breath -> blur and noise."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from covidtrack.phantom.anatomy import Atlas, render_atlas, sample_params
from covidtrack.phantom.disease import (
    DiseaseCourse,
    apply_disease,
    periphery_field,
    sample_course,
    strength_field,
    texture_field,
)
from covidtrack.phantom.grid import Grid
from covidtrack.phantom.motion import BodyMap, PoseChange, render_followup, sample_pose, true_displacement
from covidtrack.phantom.truth import TISSUE_IDS, Truth, lungs_from_lobes
from covidtrack.volume import ScanMeta, Volume

DEFAULT_SHAPE = (160, 256, 256)
DEFAULT_SPACING = (2.0, 1.4, 1.4)
DEMO_SHAPE = (72, 128, 128)
DEMO_SPACING = (4.5, 2.7, 2.7)

# independent random streams, so that e.g. more timepoints never change the anatomy
_ANATOMY, _DISEASE, _TEXTURE, _DAYS, _POSE, _NOISE = range(6)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *extra])


def _set_threads() -> None:
    import torch

    from covidtrack.config import settings

    torch.set_num_threads(settings().threads)


def _finish(hu: np.ndarray, grid: Grid, rng: np.random.Generator, noise_hu: float, blur_sigma_vox: float) -> np.ndarray:
    """CT-like image formation: correlated noise and a ~1 voxel Gaussian blur, to int16 HU.

    White noise is added before the blur and scaled so the blurred noise has std ``noise_hu``;
    the blur then also gives the noise the fine-grained correlation of a soft CT kernel.
    """
    img = np.array(hu, dtype=np.float32, copy=True)
    if noise_hu > 0:
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        if blur_sigma_vox > 0:
            # std of blurred white noise = sqrt(sum of squared kernel weights), per axis
            k = ndi.gaussian_filter1d(np.eye(1, 31, 15, dtype=np.float64)[0], blur_sigma_vox, truncate=3.0)
            gain = float(np.sqrt(np.sum(k**2))) ** 3
        else:
            gain = 1.0
        noise *= np.float32(noise_hu / gain)
        img += noise
        del noise
    if blur_sigma_vox > 0:
        img = ndi.gaussian_filter(img, blur_sigma_vox, truncate=3.0)
    np.clip(img, -1024, 3071, out=img)
    np.rint(img, out=img)
    return img.astype(np.int16)


def _volume(array: np.ndarray, grid: Grid, seed: int, study_date: dt.date, index: int) -> Volume:
    nz, ny, nx = grid.shape
    sz, sy, sx = grid.spacing
    origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)  # LPS, centred
    meta = ScanMeta(
        patient_key=f"phantom-{seed}",
        study_date=study_date,
        series_description=f"covidtrack phantom seed {seed} timepoint {index}",
        manufacturer="covidtrack phantom",
        kernel="synthetic soft",
        slice_thickness_mm=float(sz),
        source_format="phantom",
        source_name=f"phantom-{seed}-t{index}",
    )
    return Volume(array=array, spacing=(float(sz), float(sy), float(sx)), origin=origin, meta=meta)


class PhantomPatient:
    """One synthetic patient: anatomy, disease course and texture, rendered on any day."""

    def __init__(
        self,
        seed: int,
        shape: tuple[int, int, int] = DEFAULT_SHAPE,
        spacing: tuple[float, float, float] = DEFAULT_SPACING,
        severity: float | None = None,
        healthy: bool = False,
        resolution_rate: float = 1.0,
        peak_day: float | None = None,
        disease_seed: int | None = None,
    ) -> None:
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"shape must be three sizes >= 8 (z, y, x), got {shape}")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive mm values (z, y, x), got {spacing}")
        if severity is not None and not 0.0 <= severity <= 1.0:
            raise ValueError(f"severity must be in [0, 1], got {severity}")
        self.seed = int(seed)
        self.grid = Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing))  # type: ignore[arg-type]
        rng = _rng(seed, _ANATOMY)
        self.params = sample_params(self.grid, rng)
        self.atlas: Atlas = render_atlas(self.grid, self.params, rng)
        rng_d = _rng(seed if disease_seed is None else disease_seed, _DISEASE)
        drawn = float(rng_d.uniform(0.35, 0.95))
        self.severity = 0.0 if healthy else (drawn if severity is None else float(severity))
        self.course: DiseaseCourse = sample_course(
            self.atlas.lobes,
            self.atlas.pleura_mm,
            self.atlas.coarse_factor,
            self.grid,
            rng_d,
            self.severity,
            resolution_rate=resolution_rate,
            scale=self.params.scale,
            peak_day=peak_day,
        )
        self.texture = texture_field(self.grid, _rng(seed, _TEXTURE))
        self.periphery = periphery_field(self.atlas.pleura_mm, self.atlas.coarse_factor, self.grid)

    def body_frame(self, day: float) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU and packed label code (lobes | infection << 3 | tissue << 5) on ``day``."""
        a = self.atlas
        if self.course.lesions:
            strength = strength_field(self.course, day, self.grid, self.texture, self.periphery)
            hu, infection = apply_disease(a.hu, a.lobes, strength, self.texture)
        else:
            hu, infection = a.hu, np.zeros_like(a.lobes)
        code = a.lobes | (infection << 3) | (a.tissue << 5)
        return hu, code

    def scan(
        self,
        day: float,
        index: int,
        study_date: dt.date,
        pose: PoseChange | None,
        noise_hu: float,
        blur_sigma_vox: float,
        course_offset_days: float = 0.0,
    ) -> tuple[Volume, Truth]:
        """Render the scan of ``day`` (since baseline; the disease is evaluated on its own
        timeline at ``day + course_offset_days``); ``pose`` None = baseline position."""
        hu, code = self.body_frame(day + course_offset_days)
        displacement = None
        if pose is not None:
            body_map = BodyMap(self.grid, self.params, pose)
            hu, code, jac = render_followup(body_map, hu, code)
            # lung density follows the breath: mass is conserved, HU + 1000 ~ density
            tissue = code >> 5
            aerated = ((tissue == TISSUE_IDS["lung"]) | (tissue == TISSUE_IDS["vessel"])) & (hu < -300)
            hu[aerated] = (hu[aerated] + 1000.0) * jac[aerated] - 1000.0
            displacement = true_displacement(body_map)
        image = _finish(hu, self.grid, _rng(self.seed, _NOISE, index), noise_hu, blur_sigma_vox)
        lobes = code & 7
        truth = Truth(
            lungs=lungs_from_lobes(lobes),
            lobes=np.ascontiguousarray(lobes),
            infection=np.ascontiguousarray((code >> 3) & 3),
            tissue=np.ascontiguousarray(code >> 5),
            day=float(day),
            displacement=displacement,
            spacing=self.grid.spacing,
            rotation_deg=pose.rotation_deg if pose else (0.0, 0.0, 0.0),
            translation_mm=pose.translation_mm if pose else (0.0, 0.0, 0.0),
            inspiration_mm=pose.inspiration_mm if pose else 0.0,
        )
        return _volume(image, self.grid, self.seed, study_date, index), truth


def _default_days(seed: int, n: int) -> list[float]:
    steps = _rng(seed, _DAYS).integers(3, 6, size=max(n - 1, 0))  # clinical follow-up every 3-5 days
    return [0.0] + [float(d) for d in np.cumsum(steps)]


def make_series(
    seed: int,
    n_timepoints: int = 5,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    *,
    days: Sequence[float] | None = None,
    severity: float | None = None,
    healthy: bool = False,
    resolution_rate: float = 1.0,
    course_offset_days: float = 0.0,
    peak_day: float | None = None,
    disease_seed: int | None = None,
    motion: bool = True,
    noise_hu: float = 20.0,
    blur_sigma_vox: float = 0.8,
    start_date: dt.date | None = None,
) -> list[tuple[Volume, Truth]]:
    """A longitudinal series of one synthetic COVID-19 patient: ``[(Volume, Truth), ...]``.

    - ``shape`` (z, y, x) voxels and ``spacing`` (z, y, x) mm give one grid shared by all
      timepoints (same origin too). The anatomy is sized in mm; fields of view smaller than a
      chest get a smaller patient (ValueError below about 170 x 182 x 187 mm).
    - ``days``: days since the baseline (first must be 0, increasing; when given, its length
      replaces ``n_timepoints``); default every 3-5 days.
      The disease peaks around day 9-13 and resolves afterwards, lobe by lobe.
    - ``severity`` in [0, 1] (default drawn from the seed), ``healthy=True`` for no disease;
      ``resolution_rate`` > 1 resolves faster (a treatment effect); ``course_offset_days``
      shifts the baseline later into the illness (the peak then comes that many days earlier);
      ``peak_day`` fixes the patient's peak on the illness timeline (default drawn from 9-13);
      ``disease_seed`` (default ``seed``) draws severity, lesion sizes, strengths and timing
      from another seed: two patients sharing it have matched disease (positions still differ).
    - ``motion``: follow-ups get a new pose (a few degrees, some mm) and breath, recorded in
      ``Truth.displacement`` (see :mod:`covidtrack.phantom.motion` for the convention); with
      ``motion=False`` follow-ups are aligned and their displacement is zero.
    - ``noise_hu`` (std, HU) and ``blur_sigma_vox`` (Gaussian sigma in voxels) set image quality.

    Deterministic for a seed (and arguments).
    """
    if days is None and n_timepoints < 1:
        raise ValueError(f"n_timepoints must be >= 1, got {n_timepoints}")
    day_list = _default_days(seed, n_timepoints) if days is None else [float(d) for d in days]
    if not day_list or day_list[0] != 0.0 or any(b <= a for a, b in zip(day_list, day_list[1:])):
        raise ValueError(f"days must start at 0 and increase, got {day_list}")
    _set_threads()
    patient = PhantomPatient(
        seed,
        shape,
        spacing,
        severity=severity,
        healthy=healthy,
        resolution_rate=resolution_rate,
        peak_day=peak_day,
        disease_seed=disease_seed,
    )
    if start_date is None:
        start_date = dt.date(2020, 3, 1) + dt.timedelta(days=int(_rng(seed, _DAYS, 1).integers(0, 300)))
    out = []
    for i, day in enumerate(day_list):
        if i == 0:
            pose = None
        elif motion:
            pose = sample_pose(_rng(seed, _POSE, i), patient.params.scale)
        else:
            pose = PoseChange()
        date = start_date + dt.timedelta(days=int(round(day)))
        out.append(patient.scan(day, i, date, pose, noise_hu, blur_sigma_vox, course_offset_days))
    return out


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    *,
    day: float | None = None,
    severity: float | None = None,
    healthy: bool = False,
    noise_hu: float = 20.0,
    blur_sigma_vox: float = 0.8,
) -> tuple[Volume, Truth]:
    """One synthetic chest CT with its truth (no displacement).

    By default the scan shows the patient's disease at its peak (``day`` = the patient's peak
    day, 9-13); ``healthy=True`` or ``severity=0`` gives a disease-free scan.
    """
    _set_threads()
    patient = PhantomPatient(seed, shape, spacing, severity=severity, healthy=healthy)
    d = patient.course.peak_day if day is None else float(day)
    date = dt.date(2020, 3, 1) + dt.timedelta(days=int(round(d)))
    return patient.scan(d, 0, date, None, noise_hu, blur_sigma_vox)

"""ANTsPy registration of a follow-up CT (moving) to its baseline (fixed), focused on the lungs.

Method (measured on 2 CPU cores, see ``bench/results/register.json``):

1. Both scans are cropped to their lungs (plus a margin), lung-windowed (-1000..200 HU scaled to
   0..1), smoothed and resampled to about :data:`WORK_SPACING_MM` mm. The lungs fill only part of a
   chest CT field of view, so the crop removes most voxels from the optimisation.
2. Initial translation: the lung-mask centroids are matched (robust when the table position
   differs by many cm, where intensity-based initialisation can lock onto the body outline).
3. Affine stage on smoothed lung masks (mean squares): the lung outline drives the global
   alignment, so new or resolved infection (which changes intensities) cannot bias it.
4. Deformable SyN stage: Mattes mutual information of the lung-windowed intensities (vessels,
   airways and fissures drive the inside of the lungs). The metric is masked in both scans to
   the dilated lungs minus the (dilated) infection: new or resolved infection has no counterpart
   in the other scan and would otherwise be shrunk or stretched to look like normal lung (on
   phantoms this cut the error at infected voxels from 2.1 to 0.5 mm).

Conventions: ANTs transforms map *fixed* physical points to *moving* physical points (LPS, mm);
warping an image pulls moving values onto the fixed grid. All files go under the ``workdir``
given to :func:`register` (never into the system temp folder).

Quality assurance (:class:`RegistrationQA`): after warping the moving lung labels into the
baseline, ``ok`` requires

- lung Dice (mean over right and left, labels must match sides) >= :data:`QA_MIN_LUNG_DICE`;
- mean symmetric surface distance between the lung outlines <= :data:`QA_MAX_SURFACE_MM` mm;
- fraction of baseline lung voxels whose Jacobian determinant is <= 0 (folding)
  <= :data:`QA_MAX_FOLDING`.

A left-right mirrored follow-up fails the Dice check (right lung lands on left lung; tested),
and so does an optimisation that leaves the lungs misaligned.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from covidtrack.config import settings
from covidtrack.errors import InputError
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Mat3, Vec3, Volume

if TYPE_CHECKING:  # ants is heavy; import it only when registering or warping
    import ants as ants_t

# Working resolution of the optimisation (mm). Measured on the 512x512x141 series with a known
# deformation (2 cores): 2.5 mm / SyN 60x40x20 -> 0.60 mm mean error, 76 s CPU; 3 mm / 40x20x10
# -> 0.66 mm, 33 s CPU. The lungs' vessels are still resolved at 3 mm.
WORK_SPACING_MM = 3.0
SYN_ITERATIONS = (40, 20, 10)
# Margins around the lung bounding box (mm): the baseline needs only the lungs and their wall;
# the follow-up needs room for the lungs to move into.
FIXED_MARGIN_MM = 12.0
MOVING_MARGIN_MM = 30.0
# ANTs samples the metric at random points; a fixed seed makes a re-run give the same numbers
# (with the same ITK thread count).
RANDOM_SEED = 20200314
# Lung window used for the intensity metric (HU).
WINDOW_HU = (-1000.0, 200.0)

QA_MIN_LUNG_DICE = 0.90
QA_MAX_SURFACE_MM = 3.0
QA_MAX_FOLDING = 0.005

REG_FILE = "registration.json"
FORMAT_VERSION = 1


def _ants() -> Any:
    """Import ants after pinning ITK's thread count (ITK reads it once, at first use)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(settings().threads)
    import ants
    import ants.config

    # process-wide and never restored: registrations may run in parallel threads (dashboard)
    ants.config._random_seed = RANDOM_SEED  # read by ants.registration
    return ants


@dataclass(frozen=True)
class Grid:
    """Geometry of a canonical volume: shape and spacing in (z, y, x); origin LPS (x, y, z) mm."""

    shape: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: Mat3

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        return cls(
            shape=volume.shape,
            spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in volume.origin),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in volume.direction),  # type: ignore[arg-type]
        )

    @property
    def matrix(self) -> np.ndarray:
        """3x3 direction matrix (columns = index axes x, y, z in LPS)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def physical_points(self, index_zyx: np.ndarray) -> np.ndarray:
        """Voxel indices (N, 3) in (z, y, x) -> LPS points (N, 3) in (x, y, z) mm."""
        idx_xyz = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]
        return np.asarray(self.origin) + (idx_xyz * np.asarray(self.spacing[::-1])) @ self.matrix.T

    def to_ants(self, array: np.ndarray) -> "ants_t.ANTsImage":
        """An array on this grid (z, y, x) as an ANTs image (ANTs arrays are indexed x, y, z)."""
        ants = _ants()
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} differs from grid {self.shape}")
        return ants.from_numpy(
            np.ascontiguousarray(array.T),
            origin=list(self.origin),
            spacing=list(self.spacing[::-1]),
            direction=self.matrix,
        )

    def crop(self, lo: np.ndarray, hi: np.ndarray) -> "Grid":
        """Sub-grid of index box [lo, hi) in (z, y, x)."""
        lo = np.asarray(lo, dtype=np.int64)
        origin = self.physical_points(lo[None, :].astype(np.float64))[0]
        return Grid(
            shape=tuple(int(v) for v in (np.asarray(hi) - lo)),  # type: ignore[arg-type]
            spacing=self.spacing,
            origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
            direction=self.direction,
        )


@dataclass(frozen=True)
class RegistrationQA:
    """Agreement of the baseline lungs with the warped follow-up lungs, and transform sanity.

    ``lung_dice``: mean of right- and left-lung Dice (0..1); ``mean_surface_mm``: mean symmetric
    distance between the lung outlines (mm); ``folding_fraction``: fraction of baseline lung
    voxels with Jacobian determinant <= 0 (0..1); ``lung_dice_before``: the same Dice with no
    transform at all (scans overlaid in physical space), to show what registration gained.
    """

    lung_dice: float
    lung_dice_right: float
    lung_dice_left: float
    mean_surface_mm: float
    folding_fraction: float
    lung_dice_before: float

    @property
    def ok(self) -> bool:
        """All thresholds met (see the module docstring)."""
        return (
            self.lung_dice >= QA_MIN_LUNG_DICE
            and self.mean_surface_mm <= QA_MAX_SURFACE_MM
            and self.folding_fraction <= QA_MAX_FOLDING
        )

    @property
    def problems(self) -> tuple[str, ...]:
        """Human-readable reasons why ``ok`` is False (empty when ok)."""
        out = []
        if not self.lung_dice >= QA_MIN_LUNG_DICE:
            out.append(f"lung Dice {self.lung_dice:.3f} < {QA_MIN_LUNG_DICE}")
        if not self.mean_surface_mm <= QA_MAX_SURFACE_MM:
            out.append(f"mean surface distance {self.mean_surface_mm:.2f} mm > {QA_MAX_SURFACE_MM} mm")
        if not self.folding_fraction <= QA_MAX_FOLDING:
            out.append(f"folding {100 * self.folding_fraction:.2f} % of lung voxels > {100 * QA_MAX_FOLDING} %")
        return tuple(out)


@dataclass(frozen=True)
class Registration:
    """A follow-up registered to its baseline; reloadable from ``folder / registration.json``.

    ``transforms`` / ``inverse_transforms`` are file names inside ``folder`` in ANTs order:
    ``transforms`` pull moving-space images onto the fixed grid (and map fixed points to moving
    points); ``inverse_transforms`` with ``inverse_invert`` go the other way.
    ``seconds`` is the wall time of :func:`register` (s).
    """

    folder: Path
    fixed_grid: Grid
    moving_grid: Grid
    transforms: tuple[str, ...]
    inverse_transforms: tuple[str, ...]
    inverse_invert: tuple[bool, ...]
    qa: RegistrationQA
    seconds: float
    params: dict[str, float | str]

    @property
    def ok(self) -> bool:
        return self.qa.ok

    @property
    def transform_paths(self) -> tuple[Path, ...]:
        """Absolute paths of the forward transforms (moving -> fixed image warping)."""
        return tuple(self.folder / name for name in self.transforms)

    @property
    def inverse_transform_paths(self) -> tuple[Path, ...]:
        return tuple(self.folder / name for name in self.inverse_transforms)

    # --- warping ----------------------------------------------------------------------------
    def _warp(self, array: np.ndarray, interpolator: str, default: float) -> np.ndarray:
        ants = _ants()
        if array.shape != self.moving_grid.shape:
            raise ValueError(f"array shape {array.shape} is not the moving grid {self.moving_grid.shape}")
        for path in self.transform_paths:
            if not path.exists():
                raise InputError(path, "registration transform file is missing",
                                 "re-run `python -m covidtrack register --patient ID --force` for this patient")
        moving = self.moving_grid.to_ants(array.astype(np.float32))
        reference = self.fixed_grid.to_ants(np.zeros(self.fixed_grid.shape, dtype=np.float32))
        out = ants.apply_transforms(
            fixed=reference, moving=moving, transformlist=[str(p) for p in self.transform_paths],
            interpolator=interpolator, defaultvalue=default,
        )
        return np.ascontiguousarray(out.numpy().T)

    def warp_labels(self, array: np.ndarray, outside: int = 0) -> np.ndarray:
        """A label map on the moving grid -> the fixed grid, uint8 (generic-label
        interpolation: every output value is one of the input labels). Fixed-grid voxels the
        moving scan does not cover (a follow-up with a shorter field of view) get ``outside``;
        pass a value no label uses (e.g. :data:`NOT_IMAGED`) to tell them from "no label"."""
        return np.rint(self._warp(array, "genericLabel", float(outside))).astype(np.uint8)

    def warp_image(self, array: np.ndarray, default_hu: float = -1024.0) -> np.ndarray:
        """An HU image on the moving grid -> the fixed grid (linear interpolation), int16 HU.
        Outside the follow-up's field of view the value is ``default_hu`` (air)."""
        out = self._warp(array, "linear", default_hu)
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    def map_points(self, points_lps: np.ndarray) -> np.ndarray:
        """Fixed-space physical points (N, 3) LPS (x, y, z) mm -> where the same tissue is in
        the moving scan (N, 3) LPS mm."""
        import pandas as pd

        ants = _ants()
        pts = pd.DataFrame(np.asarray(points_lps, dtype=np.float64), columns=["x", "y", "z"])
        # The image-warping chain pulls values from T(p) for each fixed point p, so applied to a
        # point set it maps fixed points to moving points (checked in tests/test_register.py).
        out = ants.apply_transforms_to_points(3, pts, [str(p) for p in self.transform_paths])
        return out[["x", "y", "z"]].to_numpy(dtype=np.float64)

    # --- persistence ------------------------------------------------------------------------
    def save(self) -> Path:
        """Write ``registration.json`` into ``folder`` (paths relative, so the folder can move)."""
        doc = {
            "format": FORMAT_VERSION,
            "fixed_grid": asdict(self.fixed_grid),
            "moving_grid": asdict(self.moving_grid),
            "transforms": list(self.transforms),
            "inverse_transforms": list(self.inverse_transforms),
            "inverse_invert": list(self.inverse_invert),
            "qa": asdict(self.qa),
            "ok": self.ok,
            "seconds": self.seconds,
            "params": self.params,
        }
        path = self.folder / REG_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)  # atomic: a crash never leaves half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Registration":
        """Reload from a registration folder or its ``registration.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / REG_FILE
        if not path.exists():
            raise InputError(path, "no saved registration here",
                             "re-run `python -m covidtrack register --patient ID`")
        try:
            doc = json.loads(path.read_text())
            folder = path.parent

            def grid(d: dict[str, Any]) -> Grid:
                return Grid(shape=tuple(d["shape"]), spacing=tuple(d["spacing"]),  # type: ignore[arg-type]
                            origin=tuple(d["origin"]), direction=tuple(d["direction"]))  # type: ignore[arg-type]

            reg = cls(
                folder=folder,
                fixed_grid=grid(doc["fixed_grid"]),
                moving_grid=grid(doc["moving_grid"]),
                transforms=tuple(doc["transforms"]),
                inverse_transforms=tuple(doc["inverse_transforms"]),
                inverse_invert=tuple(bool(b) for b in doc["inverse_invert"]),
                qa=RegistrationQA(**doc["qa"]),
                seconds=float(doc["seconds"]),
                params=dict(doc["params"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"registration file is not readable ({err})",
                             "delete the folder and re-run `python -m covidtrack register --patient ID`") from err
        missing = [p for p in reg.transform_paths + reg.inverse_transform_paths if not p.exists()]
        if missing:
            raise InputError(missing[0], "registration transform file is missing",
                             "re-run `python -m covidtrack register --patient ID`")
        return reg


# --- preparation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prepared:
    """One scan ready for ANTs: cropped, windowed, resampled to the working grid."""

    image: Any  # ants image, lung-windowed 0..1
    lungs: Any  # ants image, labels 0/1/2 on the working grid
    soft_mask: Any  # ants image, smoothed binary lung mask 0..1
    metric_mask: Any  # ants image 0/1: dilated lungs minus (dilated) infection
    centroid: np.ndarray  # LPS (x, y, z) mm of the lung mask


def _lung_box(lungs: np.ndarray, spacing: Vec3, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(lungs > 0)
    margin = np.ceil(margin_mm / np.asarray(spacing)).astype(np.int64)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, np.asarray(lungs.shape))
    return lo, hi


def _prepare(volume: Volume, lungs: np.ndarray, infection: np.ndarray, margin_mm: float) -> _Prepared:
    ants = _ants()
    grid = Grid.of(volume)
    lo, hi = _lung_box(lungs, volume.spacing, margin_mm)
    sub = grid.crop(lo, hi)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    lo_hu, hi_hu = WINDOW_HU
    win = (np.clip(volume.array[sl].astype(np.float32), lo_hu, hi_hu) - lo_hu) / (hi_hu - lo_hu)
    target = [max(WORK_SPACING_MM, s) for s in sub.spacing[::-1]]  # never upsample (x, y, z)
    # Anti-aliasing before downsampling: Gaussian with sigma ~ 0.4 x the new spacing (mm).
    sigma = [0.4 * t if t > s * 1.2 else 0.0 for t, s in zip(target, sub.spacing[::-1])]
    img = sub.to_ants(win)
    if max(sigma) > 0:
        img = ants.smooth_image(img, sigma, sigma_in_physical_coordinates=True)
    img = ants.resample_image(img, target, use_voxels=False, interp_type=0)
    lab = ants.resample_image_to_target(sub.to_ants(lungs[sl].astype(np.float32)), img, interp_type="genericLabel")
    binary = ants.threshold_image(lab, 0.5, 1e9, 1, 0)
    soft = ants.smooth_image(binary, 0.8 * WORK_SPACING_MM, sigma_in_physical_coordinates=True)  # mm
    centroid = grid.physical_points(np.argwhere(lungs > 0).mean(axis=0)[None, :])[0]
    # Cost-function masking: infection that appears or resolves has no counterpart in the other
    # scan, and the metric would shrink or stretch it to match normal lung. Leaving it out of the
    # metric lets the regularised field carry the surrounding anatomy through it.
    mask = ants.iMath(binary, "MD", 3)
    if (infection > 0).any():
        inf = ants.resample_image_to_target(sub.to_ants((infection[sl] > 0).astype(np.float32)), img, interp_type="linear")
        inf = ants.iMath(ants.threshold_image(inf, 0.25, 1e9, 1, 0), "MD", 1)
        mask = mask * (1 - inf)
    return _Prepared(image=img, lungs=lab, soft_mask=soft, metric_mask=mask, centroid=centroid)


def _write_translation(path: Path, offset_lps: np.ndarray) -> str:
    """An ANTs affine file holding a pure translation (fixed point + offset = moving point)."""
    ants = _ants()
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    translation=[float(v) for v in offset_lps])
    ants.write_transform(tx, str(path))
    return str(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def _mean_surface_mm(a: np.ndarray, b: np.ndarray, spacing_zyx: Vec3, ignore: np.ndarray | None = None) -> float:
    """Mean symmetric distance (mm) between the outlines of two binary masks; outline voxels in
    ``ignore`` (e.g. where a follow-up's field of view ends: a cut, not an organ surface) do not count."""
    if not a.any() or not b.any():
        return float("inf")
    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    if ignore is not None:
        sa, sb = sa & ~ignore, sb & ~ignore
        if not sa.any() or not sb.any():
            return float("inf")
    da = ndimage.distance_transform_edt(~sa, sampling=spacing_zyx)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing_zyx)
    return float((db[sa].sum() + da[sb].sum()) / (sa.sum() + sb.sum()))


def _sides_dice(fixed_lab: np.ndarray, warped_lab: np.ndarray) -> tuple[float, float]:
    return (_dice(fixed_lab == RIGHT_LUNG, warped_lab == RIGHT_LUNG),
            _dice(fixed_lab == LEFT_LUNG, warped_lab == LEFT_LUNG))


def _affine_det(path: str) -> float:
    ants = _ants()
    params = np.asarray(ants.read_transform(path).parameters, dtype=np.float64)
    return float(np.linalg.det(params[:9].reshape(3, 3)))


def _qa(fixed: _Prepared, moving: _Prepared, fwd: list[str]) -> RegistrationQA:
    ants = _ants()
    fixed_lab = np.rint(fixed.lungs.numpy()).astype(np.uint8)
    warped = ants.apply_transforms(fixed=fixed.lungs, moving=moving.lungs, transformlist=fwd,
                                   interpolator="genericLabel")
    warped_lab = np.rint(warped.numpy()).astype(np.uint8)
    # Where the follow-up has data at all: baseline lung it never imaged (a field of view short of
    # the apex or the bases) is not misregistration, and the plane where it ends is not a surface.
    ones = moving.lungs.new_image_like(np.ones(moving.lungs.shape, dtype=np.float32))
    seen = ants.apply_transforms(fixed=fixed.lungs, moving=ones, transformlist=fwd, interpolator="nearestNeighbor",
                                 defaultvalue=0.0).numpy() > 0.5
    cut = ndimage.binary_dilation(~seen, iterations=2)  # the border of what was seen, and beyond
    fixed_seen = np.where(seen, fixed_lab, 0).astype(np.uint8)
    before = ants.resample_image_to_target(moving.lungs, fixed.lungs, interp_type="genericLabel")
    before_lab = np.rint(before.numpy()).astype(np.uint8)
    right, left = _sides_dice(fixed_seen, warped_lab)
    b_right, b_left = _sides_dice(fixed_lab, before_lab)
    spacing_xyz = tuple(float(s) for s in fixed.lungs.spacing)
    msd = _mean_surface_mm(fixed_seen > 0, warped_lab > 0, spacing_xyz, ignore=cut)  # arrays are (x, y, z) here
    # Folding: det of the whole chain = det(affine) * det(Jacobian of the SyN field).
    det = np.ones_like(fixed_lab, dtype=np.float64)
    for path in fwd:
        if path.endswith(".mat"):
            det *= _affine_det(path)
        else:
            det *= ants.create_jacobian_determinant_image(fixed.lungs, path).numpy()
    lung = fixed_lab > 0
    folding = float((det[lung] <= 0).mean()) if lung.any() else 1.0
    return RegistrationQA(
        lung_dice=(right + left) / 2, lung_dice_right=right, lung_dice_left=left,
        mean_surface_mm=msd, folding_fraction=folding, lung_dice_before=(b_right + b_left) / 2,
    )


def _check_inputs(volume: Volume, seg: Segmentation, role: str) -> None:
    name = volume.meta.source_name or f"{role} scan"
    if seg.shape != volume.shape:
        raise InputError(name, f"{role} segmentation shape {seg.shape} differs from the volume {volume.shape}",
                         "segment this scan again so masks and CT share the canonical grid")
    if not (seg.lungs > 0).any():
        raise InputError(name, f"{role} scan has an empty lung mask, nothing to register",
                         "check the lung segmentation of this scan (correct it in the review page)")


def register(
    fixed: Volume,
    fixed_seg: Segmentation,
    moving: Volume,
    moving_seg: Segmentation,
    workdir: str | Path,
    *,
    syn_iterations: tuple[int, ...] = SYN_ITERATIONS,
) -> Registration:
    """Register ``moving`` (follow-up) to ``fixed`` (baseline); transforms go to ``workdir``.

    Lung masks (``Segmentation.lungs``, right = 1 and left = 2) of both scans are required: they
    crop, initialise and guide the registration and are the basis of the QA. Returns the saved
    :class:`Registration` (``workdir / registration.json``). ``syn_iterations`` are the SyN
    iterations per resolution level (coarse to fine; the finest level is
    :data:`WORK_SPACING_MM`, or the scan's own spacing where that is coarser).
    """
    ants = _ants()
    _check_inputs(fixed, fixed_seg, "baseline")
    _check_inputs(moving, moving_seg, "follow-up")
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    cpu: dict[str, float] = {}  # CPU seconds per stage (all threads), for the benchmark
    fp = _prepare(fixed, fixed_seg.lungs, fixed_seg.infection, FIXED_MARGIN_MM)
    mp = _prepare(moving, moving_seg.lungs, moving_seg.infection, MOVING_MARGIN_MM)
    init = _write_translation(folder / "init_translation.mat", mp.centroid - fp.centroid)
    cpu["cpu_s_prepare"] = time.process_time() - c0
    try:
        # Stage 1: affine on the lung outline only (robust to infection changing intensities).
        affine = ants.registration(
            fixed=fp.soft_mask, moving=mp.soft_mask, type_of_transform="Affine", initial_transform=[init],
            outprefix=str(folder / "affine_"), aff_metric="meansquares",
            aff_iterations=(200, 100, 50), aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0),
        )
        cpu["cpu_s_affine"] = time.process_time() - c0 - sum(cpu.values())
        # Stage 2: deformable on the lung-windowed intensities (vessels, airways, fissures), the
        # metric masked to lungs minus infection in both scans. Mattes MI measured as accurate
        # as CC here and ~10x faster; adding the lung masks as a second metric doubled the time
        # without improving the error (see README.d/registration.md).
        syn = ants.registration(
            fixed=fp.image, moving=mp.image, type_of_transform="SyNOnly",
            initial_transform=affine["fwdtransforms"], outprefix=str(folder / "syn_"),
            syn_metric="mattes", syn_sampling=32, reg_iterations=syn_iterations,
            mask=fp.metric_mask, moving_mask=mp.metric_mask,
        )
    finally:
        _remove_intermediate(folder, keep=set())
    cpu["cpu_s_syn"] = time.process_time() - c0 - sum(cpu.values())
    fwd, inv = list(syn["fwdtransforms"]), list(syn["invtransforms"])
    qa = _qa(fp, mp, fwd)
    cpu["cpu_s_qa"] = time.process_time() - c0 - sum(cpu.values())
    _remove_intermediate(folder, keep={Path(p).name for p in fwd + inv})
    reg = Registration(
        folder=folder, fixed_grid=Grid.of(fixed), moving_grid=Grid.of(moving),
        transforms=tuple(Path(p).name for p in fwd), inverse_transforms=tuple(Path(p).name for p in inv),
        inverse_invert=tuple(p.endswith(".mat") for p in inv),  # ANTs: invert the affine, not the inverse field
        qa=qa, seconds=time.perf_counter() - t0,
        params={"work_spacing_mm": WORK_SPACING_MM, "syn_iterations": "x".join(map(str, syn_iterations)),
                "random_seed": RANDOM_SEED, "itk_threads": settings().threads,
                **{k: round(v, 2) for k, v in cpu.items()}},
    )
    reg.save()
    return reg


def _remove_intermediate(folder: Path, keep: set[str]) -> None:
    """Delete the stage-1 files (initial translation, affine of the masks): the SyN output
    already composes them into its own affine file."""
    for name in ("init_translation.mat", "affine_0GenericAffine.mat"):
        if name not in keep:
            (folder / name).unlink(missing_ok=True)

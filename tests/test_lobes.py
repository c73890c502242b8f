"""Five-lobe partition: invariants, the shape prior, CT refinement, the fissure-distance evaluator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from covidtrack.segment.eval_fissures import border_points, fissure_distances, lobe_dice, lobe_shares
from covidtrack.segment.lobes import (
    LobePrior,
    central_airway,
    fissure_heights,
    load_prior,
    lobes_from_lung_mask,
    split_lungs,
)

SPACING = (2.5, 2.0, 2.0)


def ellipsoid_lungs(shape: tuple[int, int, int] = (64, 64, 96)) -> np.ndarray:
    """Two half-ellipsoid lungs (flat base = diaphragm), right lung at small x, a gap between."""
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    lungs = np.zeros(shape, np.uint8)
    for label, cx in ((1, nx * 0.27), (2, nx * 0.73)):
        inside = ((z - 4) / (nz * 0.85)) ** 2 + ((y - ny / 2) / (ny * 0.42)) ** 2 + ((x - cx) / (nx * 0.2)) ** 2 < 1.0
        lungs[inside & (z >= 4)] = label
    return lungs


def assert_partition_invariants(lobes: np.ndarray, lungs: np.ndarray) -> None:
    assert lobes.dtype == np.uint8 and lobes.shape == lungs.shape
    assert np.array_equal(lobes > 0, lungs > 0), "every lung voxel gets exactly one lobe, nothing outside"
    assert set(np.unique(lobes[lungs == 1])) <= {1, 2, 3}
    assert set(np.unique(lobes[lungs == 2])) <= {4, 5}
    # each lobe is one piece within the main body of its lung; a lung fragment that touches
    # nothing else (real masks have a few) cannot be connected and keeps its positional label
    main = np.zeros(lungs.shape, bool)
    for side in (1, 2):
        comp, n = ndi.label(lungs == side)
        if n:
            main |= comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1
    assert (lungs > 0).sum() - main.sum() < 0.005 * (lungs > 0).sum()
    for lab in range(1, 6):
        _, n = ndi.label((lobes == lab) & main)
        assert n == 1, f"lobe {lab} has {n} pieces"


# --------------------------------------------------------------------------------------------
def test_shipped_prior_loads_with_card() -> None:
    prior = load_prior()
    assert prior.version.startswith("lobes/")
    for grid in prior.surfaces.values():
        assert grid.min() >= 0.0 and grid.max() <= 1.0
    # anatomy the prior must have learned: the oblique fissure rises from front to back
    v = np.array([0.1, 0.9])
    w = np.array([0.5, 0.5])
    for name in ("right_oblique", "left_oblique"):
        front, back = prior.sample(name, v, w)
        assert back > front + 0.2, name


def test_prior_save_load_roundtrip(tmp_path: Path) -> None:
    prior = load_prior()
    prior.save(tmp_path)
    again = LobePrior.load(tmp_path, version="x")
    for name, grid in prior.surfaces.items():
        assert np.allclose(again.surfaces[name], grid)


def test_invariants_on_synthetic_ellipsoid_pair() -> None:
    lungs = ellipsoid_lungs()
    lobes = lobes_from_lung_mask(lungs, SPACING)
    assert_partition_invariants(lobes, lungs)
    shares = lobe_shares(lobes)
    # an anatomical partition, not a degenerate one: every lobe present, lower lobes sizeable
    assert all(s > 2.0 for s in shares.values()), shares
    assert shares["RLL"] > shares["RML"] and shares["LLL"] > 10.0


def test_binary_mask_is_split_into_right_and_left() -> None:
    lungs = ellipsoid_lungs()
    touching = lungs > 0
    touching[20:40, 28:36, 30:66] = True  # a bridge: the lungs touch (junction line, airway)
    split = split_lungs(touching.astype(np.uint8))
    assert split[30, 32, 10] == 1 and split[30, 32, 85] == 2
    lobes = lobes_from_lung_mask(touching.astype(np.uint8), SPACING, split_binary=True)
    assert_partition_invariants(lobes, split)


def test_single_right_lung_stays_right() -> None:
    """A mask holding only label 1 is a right lung alone (e.g. after pneumonectomy), not two lungs."""
    lungs = ellipsoid_lungs()
    lungs[lungs == 2] = 0
    lobes = lobes_from_lung_mask(lungs, SPACING)
    assert set(np.unique(lobes[lungs == 1])) == {1, 2, 3}
    assert not np.isin(lobes, (4, 5)).any()


def test_trachea_above_the_lungs_is_found() -> None:
    lungs = ellipsoid_lungs()
    lungs[50:64, 30:34, 46:50] = 1  # a thin tube at the top in the middle
    airway = central_airway(lungs, SPACING)
    assert airway[60, 32, 48] and airway[55, 31, 47]
    assert not airway[20].any(), "nothing inside the lungs is airway"


def _plate_ct(lungs: np.ndarray, plane_z: np.ndarray, side: int = 2) -> np.ndarray:
    """HU -850 lung with a 1-voxel fissure plate at z = plane_z(y, x) in one lung."""
    ct = np.full(lungs.shape, -1000, np.int16)
    ct[lungs > 0] = -850
    z = np.arange(lungs.shape[0])[:, None, None]
    plate = (np.abs(z - plane_z[None]) < 0.6) & (lungs == side)
    ct[plate] = -600
    rng = np.random.default_rng(0)
    return (ct + rng.normal(0, 15, ct.shape)).astype(np.int16)


def _assert_refinement_finds(lungs: np.ndarray, side: int, name: str, true_h: np.ndarray) -> None:
    """A plate at ``true_h`` in one lung, >14 mm from the prior on average: the CT-refined
    surface must sit on it (< 3 mm where it lies inside the lung), and the lobes stay valid."""
    ct = _plate_ct(lungs, np.nan_to_num(true_h, nan=-100), side=side)
    prior_h = fissure_heights(lungs, SPACING)[name]
    refined = fissure_heights(lungs, SPACING, ct)[name]
    m = lungs == side
    z_lo = np.argmax(m, axis=0)
    z_hi = lungs.shape[0] - 1 - np.argmax(m[::-1], axis=0)
    inside = m.any(axis=0) & (true_h > z_lo + 2) & (true_h < z_hi - 2)
    err_prior = float(np.abs(prior_h - true_h)[inside].mean() * SPACING[0])
    err_ref = float(np.abs(refined - true_h)[inside].mean() * SPACING[0])
    assert err_prior > 14.0
    assert err_ref < 3.0, f"refined surface {err_ref:.1f} mm from the visible fissure"
    assert_partition_invariants(lobes_from_lung_mask(lungs, SPACING, ct), lungs)


def test_ct_search_finds_a_visible_oblique_fissure_of_another_shape() -> None:
    """Right lung: a plane rising 45 degrees towards the back (y grows posteriorly), whose shape
    the prior does not share (~19 mm away on average), is found by the orientation search."""
    lungs = ellipsoid_lungs()
    prior_h = fissure_heights(lungs, SPACING)["right_oblique"]
    cols = (lungs == 1).any(axis=0)
    yy = np.indices(prior_h.shape)[0].astype(float)
    rise = np.tan(np.radians(45.0)) * (yy - yy[cols].mean()) * SPACING[1] / SPACING[0]
    _assert_refinement_finds(lungs, 1, "right_oblique", np.where(cols, np.nanmean(prior_h[cols]) - 6.0 + rise, np.nan))


def test_left_oblique_follows_a_visible_fissure_near_the_prior() -> None:
    """Left lung (narrower refinement): a visible fissure of the prior's own shape 15 mm below it."""
    lungs = ellipsoid_lungs()
    prior_h = fissure_heights(lungs, SPACING)["left_oblique"]
    _assert_refinement_finds(lungs, 2, "left_oblique", np.where(np.isfinite(prior_h), prior_h - 6.0, np.nan))


def test_plane_start_finds_a_steeper_left_oblique_fissure() -> None:
    """Left lung: a visible plane rising 45 degrees towards the back and tilted laterally, far
    from the prior's curved surface (> 14 mm), is found whole by the plane start (lobes/v2 on)
    and then followed; the narrow passes alone stay near the prior."""
    lungs = ellipsoid_lungs()
    prior_h = fissure_heights(lungs, SPACING)["left_oblique"]
    cols = (lungs == 2).any(axis=0)
    yy, xx = np.indices(prior_h.shape).astype(float)
    rise = np.tan(np.radians(45.0)) * (yy - yy[cols].mean()) * SPACING[1] / SPACING[0]
    tilt = np.tan(np.radians(-15.0)) * (xx - xx[cols].mean()) * SPACING[2] / SPACING[0]
    _assert_refinement_finds(lungs, 2, "left_oblique", np.where(cols, np.nanmean(prior_h[cols]) - 6.0 + rise + tilt, np.nan))


def test_plane_start_needs_a_visible_fissure() -> None:
    """The plane start is used only where a fissure stands out along it: on a CT with a plate it
    is clear and lies on the plate; on lung noise alone it is not clear (the prior stands)."""
    from covidtrack.segment.fissures import EDGE_EROSION, OBLIQUE_CONE_DEG, hessian, oriented_plate, plane_start

    lungs = ellipsoid_lungs()
    prior = load_prior()
    angles = prior.planes["left_oblique"]
    prior_h = fissure_heights(lungs, SPACING)["left_oblique"]
    cols = (lungs == 2).any(axis=0)
    yy = np.indices(prior_h.shape)[0].astype(float)
    true_h = np.where(cols, np.nanmean(prior_h[cols]) + np.tan(np.radians(40.0)) * (yy - yy[cols].mean()) * SPACING[1] / SPACING[0], np.nan)
    lung = ndi.binary_erosion(lungs == 2, iterations=EDGE_EROSION)
    fits = {}
    for name, ct in (("plate", _plate_ct(lungs, np.nan_to_num(true_h, nan=-100))), ("noise", _plate_ct(lungs, np.full(prior_h.shape, -100.0)))):
        cone = oriented_plate(hessian(ct, SPACING), lung, {"oblique": OBLIQUE_CONE_DEG})["oblique"]
        scale = float(np.percentile(cone[cone > 0], 90))
        fits[name] = plane_start(cone, scale, lung, prior_h, SPACING, angles)
    assert fits["plate"].clear and not fits["noise"].clear, {k: f.contrast for k, f in fits.items()}
    assert abs(fits["plate"].rise_deg - 40.0) <= 2.5
    m = (lungs == 2).any(axis=0)
    assert float(np.nanmean(np.abs(fits["plate"].heights - true_h)[m])) * SPACING[0] < 3.0


def test_plane_angles_of_drawn_fissures_known_answer() -> None:
    """Training: a left oblique fissure drawn as a plane at known angles is measured back, and
    the statistics over cases keep at least their floor spread."""
    from covidtrack.segment.train_lobes import PLANE_SPREAD_FLOOR_DEG, CaseData, oblique_plane_angles, plane_statistics

    lungs = ellipsoid_lungs()
    cols = (lungs == 2).any(axis=0)
    yy, xx = np.indices(cols.shape).astype(float)
    h = 30.0 + (np.tan(np.radians(40.0)) * (yy - 32) * SPACING[1] + np.tan(np.radians(-15.0)) * (xx - 70) * SPACING[2]) / SPACING[0]
    z = np.arange(lungs.shape[0])[:, None, None]
    fissures = (np.abs(z - h[None]) < 0.5) & (lungs == 2)
    got = oblique_plane_angles(CaseData("synthetic", lungs, fissures, SPACING))
    assert "right_oblique" not in got  # nothing drawn there
    assert abs(got["left_oblique"]["rise_deg"] - 40.0) < 1.5 and abs(got["left_oblique"]["lateral_deg"] + 15.0) < 1.5
    assert got["left_oblique"]["rms_mm"] < 1.5
    stats = plane_statistics([got, got])
    assert stats["left_oblique"]["rise_deg"][1] == PLANE_SPREAD_FLOOR_DEG["rise_deg"]
    assert abs(stats["left_oblique"]["rise_deg"][0] - 40.0) < 1.5


def test_shipped_prior_holds_real_oblique_fissure_angles() -> None:
    """The active prior's plane angles are those of real drawn fissures: both oblique fissures
    rise towards the back, and a prior without them (lobes/v1) has none."""
    prior = load_prior()
    for name in ("right_oblique", "left_oblique"):
        assert 20.0 < prior.planes[name].rise_deg < 60.0, prior.planes
    bare = LobePrior(prior.v, prior.w, prior.surfaces, version="old", meta={})
    assert bare.planes == {}


def test_oriented_plate_tells_steep_from_flat_sheets() -> None:
    """The oblique cone keeps a 45-degree sheet and drops a flat one; the horizontal cone the reverse."""
    from covidtrack.segment.fissures import HORIZONTAL_CONE_DEG, OBLIQUE_CONE_DEG, hessian, oriented_plate

    shape, spacing = (60, 60, 40), (1.5, 1.5, 1.5)
    z, y, _ = np.indices(shape)
    ct = np.full(shape, -850.0, np.float32)
    flat = (np.abs(z - 15) < 0.6) & (y < 28)  # a horizontal sheet in the front half
    steep = (np.abs((z - 40) - (y - 45)) < 0.8) & (y > 32)  # rising 45 degrees in the back half
    ct[flat | steep] = -600.0
    region = np.ones(shape, bool)
    ev = oriented_plate(hessian(ct, spacing), region, {"oblique": OBLIQUE_CONE_DEG, "horizontal": HORIZONTAL_CONE_DEG})
    inner = (slice(None), slice(None), slice(8, 32))  # away from the sheets' side edges
    on_flat = ev["oblique"][inner][flat[inner]].mean(), ev["horizontal"][inner][flat[inner]].mean()
    on_steep = ev["oblique"][inner][steep[inner]].mean(), ev["horizontal"][inner][steep[inner]].mean()
    assert on_steep[0] > 10 * on_flat[0]
    assert on_flat[1] > 10 * on_steep[1]


def test_quadratic_surface_is_exact_on_a_quadratic() -> None:
    from covidtrack.segment.fissures import quadratic_surface

    yy, xx = np.indices((30, 40)).astype(float)
    truth = 20 + 0.3 * yy - 0.1 * xx + 0.01 * yy**2 - 0.004 * xx * yy + 0.002 * xx**2
    partial = np.where((yy > 5) & (xx < 30), truth, np.nan)  # fitted on part, evaluated everywhere
    assert np.allclose(quadratic_surface(partial, (2.0, 1.5, 1.5)), truth, atol=1e-6)


# --------------------------------------------------------------------------------------------
def test_fissure_distance_known_answer() -> None:
    """A flat fissure at z index 20 against a border between z 24 and 25: 4.5 voxels = 11.25 mm."""
    lungs = np.zeros((40, 20, 20), np.uint8)
    lungs[5:35, 2:18, 2:18] = 2
    lobes = np.where(lungs == 2, 4, 0).astype(np.uint8)
    lobes[5:25][lungs[5:25] == 2] = 5  # LLL below z = 25
    fz, fy, fx = np.nonzero((np.arange(40) == 20)[:, None, None] & (lungs == 2))
    d = fissure_distances(lobes, {"left_oblique": (fz, fy, fx)}, SPACING)["left_oblique"]
    assert d["mean_mm"] == pytest.approx(4.5 * SPACING[0], abs=1e-6)
    assert d["p95_mm"] == pytest.approx(4.5 * SPACING[0], abs=1e-6)
    # the right border of the wrong lobe pair does not count
    d2 = fissure_distances(lobes, {"right_horizontal": (fz, fy, fx)}, SPACING)["right_horizontal"]
    assert d2["mean_mm"] == float("inf")


def test_border_points_are_face_midpoints() -> None:
    lobes = np.zeros((4, 1, 1), np.uint8)
    lobes[:2] = 5
    lobes[2:] = 4
    pts = border_points(lobes, ((5, 4),), (2.0, 1.0, 1.0))
    assert pts.shape == (1, 3) and pts[0, 0] == pytest.approx(3.0)


def test_lobe_dice_identity_and_shares_sum() -> None:
    lobes = lobes_from_lung_mask(ellipsoid_lungs(), SPACING)
    assert all(v == pytest.approx(1.0) for v in lobe_dice(lobes, lobes).values())
    assert sum(lobe_shares(lobes).values()) == pytest.approx(100.0)


def test_rejects_bad_input() -> None:
    from covidtrack.errors import InputError

    with pytest.raises(InputError):
        lobes_from_lung_mask(np.zeros((4, 4), np.uint8), SPACING)
    with pytest.raises(InputError):
        lobes_from_lung_mask(np.full((4, 4, 4), 7, np.uint8), SPACING)
    lungs = ellipsoid_lungs((32, 32, 48))
    with pytest.raises(InputError):
        lobes_from_lung_mask(lungs, SPACING, np.zeros((2, 2, 2), np.int16))
    assert not lobes_from_lung_mask(np.zeros((8, 8, 8), np.uint8), SPACING).any()


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_phantom():
    series = pytest.importorskip("covidtrack.phantom.series")
    return series.make_phantom(3, (72, 128, 128), (4.5, 2.7, 2.7))


def test_phantom_partition_invariants_and_dice(small_phantom) -> None:
    volume, truth = small_phantom
    for ct in (None, volume.array):
        lobes = lobes_from_lung_mask(truth.lungs, volume.spacing, ct)
        assert_partition_invariants(lobes, truth.lungs)
        dice = lobe_dice(lobes, truth.lobes)
        # measured (docs/README.d/lobes.md): ~0.85 for RUL/LUL/LLL, ~0.79 RLL, ~0.48 RML
        for name in ("RUL", "RLL", "LUL", "LLL"):
            assert dice[name] > 0.72, (name, dice)
        assert dice["RML"] > 0.3, dice


# --------------------------------------------------------------------------------------------
def test_evaluate_fissures_cli(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    from covidtrack.segment import eval_fissures

    lungs = ellipsoid_lungs((48, 48, 72))
    fissures = np.zeros_like(lungs)
    heights = fissure_heights(lungs, SPACING)["left_oblique"]
    z = np.arange(lungs.shape[0])[:, None, None]
    fissures[(np.abs(z - heights[None]) < 0.5) & (lungs == 2)] = 1

    def write(arr: np.ndarray, name: str) -> Path:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(SPACING[::-1])
        path = tmp_path / name
        sitk.WriteImage(img, str(path))
        return path

    out = tmp_path / "res.json"
    args = argparse.Namespace(lungs=write((lungs > 0).astype(np.uint8), "lungs.nii.gz"),
                              fissures=write(fissures, "fis.nii.gz"), ct=None, json=out, model=None)
    assert eval_fissures.run(args) == 0
    res = json.loads(out.read_text())
    # the drawn fissure is the prior's own surface: the border lies on it (within ~1 voxel)
    assert res["fissure_distance"]["left_oblique"]["mean_mm"] < 2.5


def test_loo_on_real_lidc_masks(shared_data: Path) -> None:
    """The shipped card's leave-one-out numbers are what the prior really achieves."""
    from covidtrack.modelstore import active

    card = active("lobes").card()
    summary = card["validation"]["summary"]
    assert summary["prior"]["mean_distance_mm"] < summary["naive_height"]["mean_distance_mm"]
    assert summary["prior"]["mean_dice_vs_reference"] > summary["naive_height"]["mean_dice_vs_reference"]


def test_real_lidc_lung_golden() -> None:
    """A real lung with hand-drawn fissures (data/samples, ~3 mm): the prior's borders lie near
    the drawn fissures and far nearer than a naive height split. In-sample for lobes/v1."""
    from covidtrack.config import SAMPLES
    from covidtrack.segment.eval_fissures import naive_height_split
    from covidtrack.segment.train_lobes import named_fissure_voxels

    with np.load(SAMPLES / "lidc_fissures_patient3" / "patient3_3mm.npz") as data:
        lungs, fissures, spacing = data["lungs"], data["fissures"] > 0, tuple(float(s) for s in data["spacing"])
    named = named_fissure_voxels(lungs, fissures)
    assert set(named) == {"right_oblique", "right_horizontal", "left_oblique"}
    lobes = lobes_from_lung_mask(lungs, spacing)
    assert_partition_invariants(lobes, lungs)
    ours = fissure_distances(lobes, named, spacing)
    naive = fissure_distances(naive_height_split(lungs), named, spacing)
    for name in named:
        assert ours[name]["mean_mm"] < 10.0, (name, ours[name])
        assert ours[name]["mean_mm"] < 0.5 * naive[name]["mean_mm"], (name, ours[name], naive[name])
    shares = lobe_shares(lobes)
    assert 3.0 < shares["RML"] < 15.0 and 15.0 < shares["RLL"] < 35.0


def test_local_plane_fit_continues_a_surface_along_its_slope() -> None:
    """Seen on the left half only, a tilted plane is continued exactly into the right half (a
    global quadratic would bend); columns too far from any data get NaN."""
    from covidtrack.segment.fissures import local_plane_fit

    yy, xx = np.indices((40, 60)).astype(float)
    plane = 30.0 + 0.4 * yy - 0.25 * xx
    seen = xx < 30
    h = np.where(seen, plane, np.nan)
    fit = local_plane_fit(h, seen.astype(float), (2.0, 1.5, 1.5), sigma_mm=10.0)
    near = (xx >= 30) & (xx < 40)
    assert np.allclose(fit[seen], plane[seen], atol=1e-6)
    assert np.allclose(fit[near], plane[near], atol=1e-3)
    tiny = np.zeros_like(h) * np.nan
    tiny[0, 0] = 1.0
    assert np.isnan(local_plane_fit(tiny, np.isfinite(tiny).astype(float), (2.0, 1.5, 1.5), 10.0)[39, 59])


def test_thick_slices_keep_the_prior() -> None:
    """On 5 mm slices a fissure cannot be seen, so the CT must not move the borders."""
    lungs = ellipsoid_lungs((26, 64, 96))
    spacing = (5.0, 2.0, 2.0)
    prior_h = fissure_heights(lungs, spacing)["left_oblique"]
    ct = _plate_ct(lungs, np.nan_to_num(prior_h - 2.0, nan=-100), side=2)  # a plate 10 mm away
    assert np.array_equal(lobes_from_lung_mask(lungs, spacing, ct), lobes_from_lung_mask(lungs, spacing))
    thin = fissure_heights(lungs, (2.5, 2.0, 2.0), ct)["left_oblique"]  # same voxels read as 2.5 mm: used
    assert np.nanmean(np.abs(thin - fissure_heights(lungs, (2.5, 2.0, 2.0))["left_oblique"])) > 0.5

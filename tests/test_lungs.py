"""Lung model: post-processing, geometry, weights I/O, and the shipped model on a small phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidtrack.errors import ModelError
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG
from covidtrack.segment import lungs as L

# small phantom grid: 216 x 344 x 344 mm, big enough for the phantom's chest, quick to make
SMALL_SHAPE = (48, 80, 80)
SMALL_SPACING = (4.5, 4.3, 4.3)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _two_lungs(shape=(30, 60, 80), touching: bool = True) -> np.ndarray:
    """Label map of two ellipsoid lungs; right lung at low x. Touching at the midline if asked."""
    z, y, x = np.indices(shape, dtype=float)
    gap = 0.0 if touching else 6.0
    right = ((z - 15) / 13) ** 2 + ((y - 30) / 25) ** 2 + ((x - (20 - gap / 2)) / 21) ** 2 <= 1
    left = ((z - 15) / 13) ** 2 + ((y - 30) / 25) ** 2 + ((x - (60 + gap / 2)) / 21) ** 2 <= 1
    out = np.zeros(shape, dtype=np.uint8)
    out[right] = RIGHT_LUNG
    out[left & ~right] = LEFT_LUNG
    return out


def test_split_sides_separates_touching_lungs_by_geometry() -> None:
    from scipy import ndimage as ndi

    truth = _two_lungs(touching=True)
    assert ndi.label(truth > 0)[1] == 1, "the test lungs must touch"
    sides = L.split_sides(truth > 0)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        assert _dice(sides == side, truth == side) > 0.95


def test_split_sides_separate_lungs_right_at_low_x() -> None:
    truth = _two_lungs(touching=False)
    sides = L.split_sides(truth > 0)
    assert (sides == truth).all()


def test_one_lung_is_labelled_by_the_side_of_the_midline_it_lies_on() -> None:
    truth = _two_lungs(touching=False)
    for side, other in ((RIGHT_LUNG, LEFT_LUNG), (LEFT_LUNG, RIGHT_LUNG)):
        one = truth == side  # the other lung missing: consolidated, removed, or out of view
        sides = L.split_sides(one, midline=40.0)
        assert (sides[one] == side).all() and not (sides == other).any()
        # a lung with a waist may erode into two cores: both lie on one side of the midline
        waist = one.copy()
        waist[:, :, (18 if side == RIGHT_LUNG else 58): (22 if side == RIGHT_LUNG else 62)] &= (
            np.indices(one.shape)[1][:, :, :4] > 26)
        assert (L.split_sides(waist, midline=40.0)[waist] == side).all()
    fused = truth > 0  # touching lungs that never split: cut at the midline, not the box centre
    assert (L.split_sides(fused, max_erosions=0, midline=40.0) == np.where(fused, truth, 0)).mean() > 0.99


def test_body_midline_from_the_body_or_world_zero() -> None:
    from covidtrack.volume import Volume

    arr = np.full((12, 40, 60), -1000, np.int16)
    arr[:, 5:35, 10:40] = 40  # a body off-centre in the field of view: its centre is x = 25
    assert L.body_midline(Volume(array=arr, spacing=(5.0, 2.0, 2.0)))[0] == pytest.approx(25.5 / 60, abs=0.03)
    cut = np.full((12, 40, 60), 40, np.int16)  # a field of view cut through the body: world x = 0
    vol = Volume(array=cut, spacing=(5.0, 2.0, 2.0), origin=(-80.0, 0.0, 0.0))
    assert L.body_midline(vol)[0] == pytest.approx((40 + 0.5) / 60, abs=1e-6)
    assert L.body_midline(Volume(array=cut, spacing=(5.0, 2.0, 2.0))) == (None, None)  # origin 0: not a scanner's
    half = arr.copy()
    half[:, 5:35, 10:] = 40  # the body runs out of the high-x (patient's left) side of the view
    assert L.body_midline(Volume(array=half, spacing=(5.0, 2.0, 2.0))) == (None, 1.0)


def test_postprocess_cleans_noisy_sides_where_lungs_touch() -> None:
    from scipy import ndimage as ndi

    truth = _two_lungs(touching=True)
    p_lung = (truth > 0).astype(np.float32) * 0.9
    side = L.fill_nearest(truth.copy())
    # a coarse side map is wrong near the junction: flip sides at random in a band
    rng = np.random.default_rng(0)
    band = (np.abs(np.indices(truth.shape)[2] - 40) < 4) & (rng.random(truth.shape) < 0.4)
    side[band] = 3 - side[band]
    out = L.postprocess(p_lung, side)
    assert out.dtype == np.uint8 and out.shape == truth.shape
    for s in (RIGHT_LUNG, LEFT_LUNG):
        assert ndi.label(out == s)[1] == 1, "each lung must be one connected piece"
        assert _dice(out == s, truth == s) > 0.97


def test_postprocess_drops_specks_and_fills_vessels() -> None:
    truth = _two_lungs(touching=False)
    p_lung = (truth > 0).astype(np.float32) * 0.9
    p_lung[15, 28:32, 18:22] = 0.0  # a vessel inside the right lung: low lung probability
    p_lung[2:4, 2:4, 76:78] = 0.9  # a speck of gas far from the lungs
    out = L.postprocess(p_lung, L.fill_nearest(truth.copy()))
    assert (out[15, 28:32, 18:22] == RIGHT_LUNG).all()
    assert (out[2:4, 2:4, 76:78] == 0).all()


def test_postprocess_puts_right_lung_at_low_x_even_if_sides_are_swapped() -> None:
    truth = _two_lungs(touching=False)
    swapped = np.where(truth > 0, 3 - truth, 0).astype(np.uint8)
    out = L.postprocess((truth > 0).astype(np.float32), L.fill_nearest(swapped))
    assert np.nonzero(out == RIGHT_LUNG)[2].mean() < np.nonzero(out == LEFT_LUNG)[2].mean()


def test_postprocess_empty_input_gives_empty_mask() -> None:
    z = np.zeros((4, 5, 6), dtype=np.float32)
    assert not L.postprocess(z, z.astype(np.uint8)).any()


def test_upsample_box_equals_full_interpolation() -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    probs = torch.rand(2, 7, 9, 11)
    shape = (20, 30, 33)
    full = F.interpolate(probs[None], size=shape, mode="trilinear", align_corners=False)[0].numpy()
    box = [slice(3, 15), slice(0, 30), slice(10, 25)]
    part = L._upsample_box(probs, shape, box)
    np.testing.assert_allclose(part, full[:, 3:15, 0:30, 10:25], atol=1e-5)


def test_model_grid_shape_follows_spacing() -> None:
    spec = L.LungNetSpec()
    assert L.model_grid_shape((141, 512, 512), (2.0, 0.9765625, 0.9765625), spec) == (70, 167, 167)
    assert L.model_grid_shape((3, 4, 4), (1.0, 0.5, 0.5), spec) == (1, 1, 1)


def test_weights_roundtrip_and_errors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    spec = L.LungNetSpec(channels=(4, 8), strides=(2,), num_res_units=0)
    net = L.build_network(spec).eval()
    path = tmp_path / "weights.pt"
    L.save_weights(net, spec, path)
    loaded, spec2 = L.load_network(path)
    assert spec2 == spec
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        np.testing.assert_allclose(net(x).numpy(), loaded(x).numpy(), atol=2e-2)  # float16 storage
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="weights.pt"):
        L.load_network(path)
    with pytest.raises(ModelError, match="missing"):
        L.load_network(tmp_path / "absent.pt")


# --- the shipped model on a phantom --------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom():
    from covidtrack.phantom import make_phantom

    return make_phantom(7, SMALL_SHAPE, SMALL_SPACING)


@pytest.fixture(scope="module")
def model():
    return L.LungModel.load()


def test_lung_model_on_phantom(phantom, model) -> None:
    volume, truth = phantom
    lungs = model.predict(volume)
    assert lungs.shape == volume.shape and lungs.dtype == np.uint8
    assert set(np.unique(lungs).tolist()) <= {0, 1, 2}
    assert _dice(lungs > 0, truth.lungs > 0) > 0.93  # coarse test grid (4.3-4.5 mm); bench uses finer
    # right lung on the patient's right = low x index in canonical orientation
    assert np.nonzero(lungs == RIGHT_LUNG)[2].mean() < np.nonzero(lungs == LEFT_LUNG)[2].mean()
    assert _dice(lungs == RIGHT_LUNG, truth.lungs == RIGHT_LUNG) > 0.9


def test_lung_model_mirrored_scan_keeps_right_at_low_x(phantom, model) -> None:
    volume, truth = phantom
    mirrored = volume.with_array(volume.array[:, :, ::-1])
    lungs = model.predict(mirrored)
    # "right" means low x on the canonical grid: after mirroring, the phantom's left lung lies at
    # low x, so the labels must follow the position, not the shape (the heart side)
    mirrored_truth = truth.lungs[:, :, ::-1]
    assert _dice(lungs == RIGHT_LUNG, mirrored_truth == LEFT_LUNG) > 0.9
    assert _dice(lungs == LEFT_LUNG, mirrored_truth == RIGHT_LUNG) > 0.9


def test_lung_model_card_and_version(model) -> None:
    from covidtrack import modelstore

    ref = modelstore.active("lungs")
    assert model.version == ref.name
    card = ref.card()
    assert card["task"] == "lungs" and card["weights_sha256"]
    assert ref.weights.stat().st_size < 20e6


def test_corrupted_shipped_weights_are_refused(tmp_path: Path) -> None:
    import json
    import shutil

    from covidtrack import modelstore

    ref = modelstore.active("lungs")
    copy = tmp_path / "lungs" / "v9"
    shutil.copytree(ref.path, copy)
    with (copy / "weights.pt").open("ab") as fh:
        fh.write(b"tampered")
    bad = modelstore.ModelRef(task="lungs", version="v9", path=copy, shipped=False)
    with pytest.raises(ModelError, match="checksum"):
        L.LungModel.load(bad)
    card = json.loads((copy / "card.json").read_text())
    card["task"] = "infection"
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="expected 'lungs'"):
        L.LungModel.load(bad)


def test_classical_targets_on_phantom(phantom) -> None:
    from covidtrack.segment.lung_targets import extract_lungs

    volume, truth = phantom
    labels, report = extract_lungs(volume)
    assert _dice(labels > 0, truth.lungs > 0) > 0.9
    assert _dice(labels == RIGHT_LUNG, truth.lungs == RIGHT_LUNG) > 0.85
    assert report.right_ml > 0 and report.left_ml > 0

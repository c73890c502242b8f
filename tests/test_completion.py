"""Lung completion: dense infection just outside the lung model's mask joins the lungs."""

from __future__ import annotations

import numpy as np

from covidtrack.segment.completion import added_voxels, assign_sides, complete_lungs, envelope

SPACING = (2.0, 1.0, 1.0)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Two box lungs (right at low x) in soft tissue; the right lung's lateral edge is cut off
    by a dense 'consolidation' that the lung mask left out."""
    ct = np.full((10, 60, 80), 40.0, np.float32)  # soft tissue
    lungs = np.zeros(ct.shape, np.uint8)
    lungs[:, 10:50, 8:35] = 1
    lungs[:, 10:50, 45:72] = 2
    ct[lungs > 0] = -850.0
    ct[:, 20:35, 4:8] = -20.0  # consolidation against the right lung's lateral border (outside the mask)
    return ct, lungs


class FakeModel:
    """Labels consolidation wherever the CT is between -100 and 0 HU inside ``region`` (the
    scene's consolidation is -20 HU, its soft tissue +40 HU), and records what it was asked."""

    def __init__(self) -> None:
        self.region = None

    def predict(self, ct, lungs, spacing, progress=None, region=None):
        self.region = region
        inside = (lungs > 0) if region is None else (region > 0) | (lungs > 0)
        labels = np.where(inside & (ct > -100) & (ct < 0), 2, 0).astype(np.uint8)
        return labels, (labels > 0).astype(np.float16)


def test_envelope_is_an_in_plane_margin() -> None:
    _, lungs = _scene()
    env = envelope(lungs, SPACING, reach_mm=5.0)
    assert env[lungs > 0].all()
    assert env[0, 30, 3] and not env[0, 30, 2]  # 5 voxels of 1 mm left of x=8
    # no growth along z (the slices above and below are not touched by an in-plane margin)
    one = np.zeros((5, 20, 20), np.uint8)
    one[2, 8:12, 8:12] = 1
    assert not envelope(one, SPACING, 5.0)[1].any()


def test_envelope_on_fine_grids_is_within_a_pixel_or_two() -> None:
    lungs = np.zeros((3, 120, 120), np.uint8)
    lungs[1, 50:70, 50:70] = 1  # 1 mm pixels, reach 20 mm: the 2 x 2 block path
    env = envelope(lungs, SPACING, reach_mm=20.0)
    yy, xx = np.mgrid[0:120, 0:120]
    dist = np.hypot(np.clip(np.maximum(50 - yy, yy - 69), 0, None), np.clip(np.maximum(50 - xx, xx - 69), 0, None))
    assert env[1][dist <= 18].all() and not env[1][dist >= 22].any()
    assert env[1][lungs[1] > 0].all() and not env[0].any() and not env[2].any()


def test_dense_infection_touching_the_lung_is_added_to_that_side() -> None:
    ct, lungs = _scene()
    model = FakeModel()
    completed, infection, prob, n_added = complete_lungs(model, ct, lungs, SPACING, reach_mm=10.0)
    bite = np.zeros(ct.shape, bool)
    bite[:, 20:35, 4:8] = True
    assert n_added == int(bite.sum())
    assert (completed[bite] == 1).all()  # the right lung, the one it touches
    assert (infection[bite] == 2).all() and (prob[bite] > 0).all()
    assert ((infection > 0) <= (completed > 0)).all()
    np.testing.assert_array_equal(completed[~bite], lungs[~bite])
    assert model.region is not None and model.region[0, 30, 0]  # the model was shown the margin


def test_mediastinum_air_edge_and_detached_blobs_are_not_added() -> None:
    ct, lungs = _scene()
    labels = np.zeros(ct.shape, np.uint8)
    labels[:, 20:35, 4:8] = 2  # dense, touching: added
    labels[:, 10:50, 36:44] = 1  # soft tissue between the lungs labelled, touching both: dense, so added...
    ct[:, 10:50, 36:44] = -700.0  # ...unless it is not dense (an air-like edge is not consolidation)
    labels[:, 52:58, 20:30] = 2  # dense but not touching the lung (2 voxels away): not added
    ct[:, 52:58, 20:30] = 0.0
    added = added_voxels(ct, lungs, labels)
    assert added[:, 20:35, 4:8].all()
    assert not added[:, 10:50, 36:44].any()
    assert not added[:, 52:58, 20:30].any()


def test_sides_follow_the_nearest_lung() -> None:
    _, lungs = _scene()
    added = np.zeros(lungs.shape, bool)
    added[:, 30, 36:40] = True  # nearer the right lung (ends at x=34)
    added[:, 30, 41:45] = True  # nearer the left lung (starts at x=45)
    out = assign_sides(lungs, added)
    assert (out[:, 30, 36:40] == 1).all() and (out[:, 30, 41:45] == 2).all()


def test_nothing_to_add_leaves_the_mask_unchanged() -> None:
    ct, lungs = _scene()
    ct[:, 20:35, 4:8] = 40.0  # no consolidation: soft tissue only
    completed, infection, _, n_added = complete_lungs(FakeModel(), ct, lungs, SPACING)
    assert n_added == 0
    np.testing.assert_array_equal(completed, lungs)
    assert not infection.any()

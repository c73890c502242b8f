"""segment(): one call from a Volume to lungs + infection + lobes, with model versions and progress."""

from __future__ import annotations

import numpy as np
import pytest

from covidtrack import modelstore
from covidtrack.events import Progress
from covidtrack.segment import Segmentation, segment
from covidtrack.segment.api import lobes_available

SMALL_SHAPE = (48, 128, 128)  # 216 x 346 x 346 mm: the phantom's chest fits, quick to make
SMALL_SPACING = (4.5, 2.7, 2.7)  # in-plane pixels near clinical; at 4.3 mm blur alone looks like GGO


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory):
    """A sick and a healthy phantom of the same patient, segmented once for the module."""
    from covidtrack.phantom import make_phantom

    if not [r for r in modelstore.list_versions("infection") if r.shipped]:
        pytest.skip("no shipped infection model yet (data/models/infection); segment() needs one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVIDTRACK_HOME", str(tmp_path_factory.mktemp("home")))
        sick_vol, sick_truth = make_phantom(11, SMALL_SHAPE, SMALL_SPACING, severity=0.8)
        healthy_vol, healthy_truth = make_phantom(11, SMALL_SHAPE, SMALL_SPACING, healthy=True)
        events: list[Progress] = []
        sick = segment(sick_vol, progress=events.append)
        healthy = segment(healthy_vol)
    return {"sick": (sick_vol, sick_truth, sick), "healthy": (healthy_vol, healthy_truth, healthy), "events": events}


def _poi(seg: Segmentation) -> float:
    lung = seg.lungs > 0
    return 100.0 * float((seg.infection > 0)[lung].sum()) / float(lung.sum())


def test_shapes_grids_and_dtypes(phantoms) -> None:
    volume, _, seg = phantoms["sick"]
    assert isinstance(seg, Segmentation)
    assert seg.lungs.shape == seg.infection.shape == volume.shape
    assert seg.lungs.dtype == np.uint8 and seg.infection.dtype == np.uint8
    assert set(np.unique(seg.lungs).tolist()) <= {0, 1, 2}
    assert set(np.unique(seg.infection).tolist()) <= {0, 1, 2}
    if lobes_available():
        assert seg.lobes is not None and seg.lobes.shape == volume.shape
        lung = seg.lungs > 0
        assert (seg.lobes[lung] > 0).all() and (seg.lobes[~lung] == 0).all()
        # lobes 1-3 in the right lung, 4-5 in the left
        assert (seg.lobes[seg.lungs == 1] <= 3).all() and (seg.lobes[seg.lungs == 2] >= 4).all()
    else:
        assert seg.lobes is None


def test_right_lung_on_patients_right(phantoms) -> None:
    _, _, seg = phantoms["sick"]
    x_right = np.nonzero(seg.lungs == 1)[2].mean()
    x_left = np.nonzero(seg.lungs == 2)[2].mean()
    assert x_right < x_left  # canonical x runs from the patient's right to left


def test_infection_inside_lungs_only(phantoms) -> None:
    for key in ("sick", "healthy"):
        _, _, seg = phantoms[key]
        assert not (seg.infection[seg.lungs == 0]).any()
        if seg.infection_prob is not None:
            assert not (seg.infection_prob[seg.lungs == 0] > 0).any()


def test_sick_phantom_gets_more_infection_than_healthy(phantoms) -> None:
    _, sick_truth, sick = phantoms["sick"]
    _, _, healthy = phantoms["healthy"]
    truth_poi = 100.0 * float((sick_truth.infection > 0).sum()) / float((sick_truth.lungs > 0).sum())
    assert truth_poi > 2.0, "test phantom should be visibly sick"
    # infection/v2 under-calls the phantoms' disease (about half of the true POI), so the test asks
    # for a clear separation, not for accuracy (that is `evaluate phantoms`' job)
    assert _poi(sick) > _poi(healthy) + 2.0
    assert _poi(sick) > 2.0 * _poi(healthy)


def test_healthy_phantom_gets_little_infection(phantoms) -> None:
    # Goal < 1 % of the lung (issue 3). infection/v3 gives 0.3 % here; v2 gave ~3.5 % and v1 23 %.
    # (On a 4.3 mm in-plane grid, far coarser than clinical CT, v3 still calls ~4.5 %: the blur of
    # such pixels looks like ground glass. README, infection weaknesses.)
    _, _, healthy = phantoms["healthy"]
    assert _poi(healthy) < 1.0


def test_model_versions_filled(phantoms) -> None:
    _, _, seg = phantoms["sick"]
    assert seg.model_versions["lungs"] == modelstore.active("lungs").name
    assert seg.model_versions["infection"] == modelstore.active("infection").name
    if lobes_available():
        assert seg.model_versions["lobes"] == modelstore.active("lobes").name


def test_progress_events(phantoms) -> None:
    events: list[Progress] = phantoms["events"]
    stages = [e.stage for e in events]
    for stage in ("lungs", "infection"):
        assert stage in stages
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions), "overall progress must never go back"
    assert fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_poi_error_parts_add_up_to_the_error_with_known_values() -> None:
    from covidtrack.segment.eval_phantoms import poi_error_parts, score

    truth_lungs = np.zeros((1, 10, 10), np.uint8)
    truth_lungs[0, :, :8] = 1  # 80 voxels
    truth_inf = np.zeros_like(truth_lungs)
    truth_inf[0, :2, :8] = 1  # 16 infected: POI 20 %
    lungs = np.zeros_like(truth_lungs)
    lungs[0, 1:, :] = 1  # 90 voxels; misses truth row 0 (8 infected voxels outside the mask)
    infection = np.zeros_like(truth_lungs)
    infection[0, 1, :4] = 1  # finds 4 of the 8 true voxels inside the mask
    infection[0, 5, :3] = 2  # 3 false positives
    parts = poi_error_parts(lungs, infection, truth_lungs, truth_inf)
    assert parts["missed_inside_lung"] == pytest.approx(-100 * 4 / 90)
    assert parts["outside_lung_mask"] == pytest.approx(-100 * 8 / 90)
    assert parts["false_positive"] == pytest.approx(100 * 3 / 90)
    assert parts["lung_volume"] == pytest.approx(100 * (16 / 90 - 16 / 80))
    row = score(0, lungs, infection, truth_lungs, truth_inf, 0.0)
    assert row.poi_error_pp == pytest.approx(100 * 7 / 90 - 20.0)
    assert sum(row.poi_error_parts_pp.values()) == pytest.approx(row.poi_error_pp)


def test_ggo_found_by_hu_band() -> None:
    from covidtrack.segment.eval_phantoms import found_by_hu

    truth = np.zeros((1, 2, 4), np.uint8)
    truth[0, 0] = 1  # four GGO voxels
    hu = np.array([[[-700.0, -700.0, -400.0, -400.0], [0.0, 0.0, 0.0, 0.0]]])
    pred = np.zeros_like(truth)
    pred[0, 0, 2:] = 1  # only the denser two are found
    shares = found_by_hu(hu, pred, truth)
    assert shares["[-750,-650)"] == 0.0 and shares["[-450,-300)"] == 1.0
    assert np.isnan(shares["[-1100,-750)"])

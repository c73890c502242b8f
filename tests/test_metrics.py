"""Metrics on masks with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidtrack import metrics as M
from covidtrack.segment.types import Segmentation
from covidtrack.volume import ScanMeta, Volume


def _value(df: pd.DataFrame, region: str, metric: str) -> float:
    sel = df[(df.region == region) & (df.metric == metric)]
    assert len(sel) == 1, f"{region}/{metric}: {len(sel)} rows"
    return float(sel.value.iloc[0])


def _box_case(spacing=(2.0, 0.5, 0.8)) -> tuple[Volume, Segmentation]:
    """Right lung 10x20x10 voxels, left lung 10x20x8, known infection blocks with known HU."""
    shape = (14, 24, 24)
    hu = np.full(shape, -850, dtype=np.int16)
    lungs = np.zeros(shape, np.uint8)
    lungs[2:12, 2:22, 1:11] = 1  # 2000 voxels right
    lungs[2:12, 2:22, 13:21] = 2  # 1600 voxels left
    inf = np.zeros(shape, np.uint8)
    inf[2:7, 2:12, 1:5] = 1  # 200 GGO voxels, right
    hu[2:7, 2:12, 1:5] = -600
    inf[2:4, 2:12, 13:18] = 2  # 100 consolidation voxels, left
    hu[2:4, 2:12, 13:18] = 30
    inf[0, 0, 0] = 1  # outside the lungs: must not count
    lobes = np.zeros(shape, np.uint8)
    lobes[2:7, 2:22, 1:11] = 1  # RUL 1000 (holds all 200 GGO -> 20 %)
    lobes[7:9, 2:22, 1:11] = 2  # RML 400
    lobes[9:12, 2:22, 1:11] = 3  # RLL 600
    lobes[2:7, 2:22, 13:21] = 4  # LUL 800 (100 cons -> 12.5 %)
    lobes[7:12, 2:22, 13:21] = 5  # LLL 800
    vol = Volume(array=hu, spacing=spacing, meta=ScanMeta(slice_thickness_mm=spacing[0]))
    return vol, Segmentation(lungs=lungs, infection=inf, lobes=lobes)


def test_volumes_poi_and_hu_on_known_boxes() -> None:
    vol, seg = _box_case()
    df = M.scan_metrics(vol, seg)
    assert list(df.columns) == ["region", "metric", "value", "unit"]
    vml = 2.0 * 0.5 * 0.8 / 1000.0
    assert _value(df, "whole", M.LUNG_VOLUME) == pytest.approx(3600 * vml)
    assert _value(df, "right", M.LUNG_VOLUME) == pytest.approx(2000 * vml)
    assert _value(df, "left", M.LUNG_VOLUME) == pytest.approx(1600 * vml)
    assert _value(df, "whole", M.INFECTION_VOLUME) == pytest.approx(300 * vml)
    assert _value(df, "whole", M.GGO_VOLUME) == pytest.approx(200 * vml)
    assert _value(df, "whole", M.CONSOLIDATION_VOLUME) == pytest.approx(100 * vml)
    assert _value(df, "whole", M.POI) == pytest.approx(100 * 300 / 3600)
    assert _value(df, "right", M.GGO_POI) == pytest.approx(10.0)
    assert _value(df, "left", M.CONSOLIDATION_POI) == pytest.approx(100 * 100 / 1600)
    assert _value(df, "RUL", M.POI) == pytest.approx(20.0)
    assert _value(df, "LUL", M.POI) == pytest.approx(12.5)
    assert _value(df, "RML", M.POI) == 0.0
    assert _value(df, "whole", M.INFECTION_MEAN_HU) == pytest.approx((200 * -600 + 100 * 30) / 300)
    assert _value(df, "whole", "infection_volume_hu_m750_m500") == pytest.approx(200 * vml)
    assert _value(df, "whole", "infection_volume_hu_ge_0") == pytest.approx(100 * vml)
    bins = sum(_value(df, "whole", b.metric) for b in M.DENSITY_BINS)
    assert bins == pytest.approx(_value(df, "whole", M.INFECTION_VOLUME))
    # lobes add up to the whole lung
    lobe_sum = sum(_value(df, r, M.LUNG_VOLUME) for r in ("RUL", "RML", "RLL", "LUL", "LLL"))
    assert lobe_sum == pytest.approx(_value(df, "whole", M.LUNG_VOLUME))
    # severity: RUL 20 % -> 2, LUL 12.5 % -> 2, others 0; total 4
    assert _value(df, "RUL", M.SEVERITY) == 2
    assert _value(df, "LUL", M.SEVERITY) == 2
    assert _value(df, "whole", M.SEVERITY) == 4
    assert set(df.unit[df.metric == M.POI]) == {"%"}
    assert df.unit.notna().all()


def test_volume_uses_scan_spacing() -> None:
    """The same voxels at twice the spacing in z give twice the volume, POI unchanged."""
    a = M.scan_metrics(*_box_case((1.0, 0.5, 0.8)))
    b = M.scan_metrics(*_box_case((2.0, 0.5, 0.8)))
    assert _value(b, "whole", M.LUNG_VOLUME) == pytest.approx(2 * _value(a, "whole", M.LUNG_VOLUME))
    assert _value(b, "whole", M.POI) == pytest.approx(_value(a, "whole", M.POI))


@pytest.mark.parametrize(
    ("infected", "expected"),
    [(0, 0), (1, 1), (4, 1), (5, 2), (25, 2), (26, 3), (49, 3), (50, 4), (75, 4), (76, 5), (100, 5)],
)
def test_severity_boundaries_from_counts(infected: int, expected: int) -> None:
    assert M.severity_from_counts(infected, 100) == expected


@pytest.mark.parametrize(("pct", "expected"), [(0.0, 0), (4.99, 1), (5.0, 2), (25.0, 2), (25.01, 3), (50.0, 4), (75.0, 4), (75.01, 5)])
def test_severity_boundaries_from_percent(pct: float, expected: int) -> None:
    assert M.severity_from_percent(pct) == expected


@pytest.mark.parametrize(("n_inf", "expected"), [(50, 2), (250, 2), (500, 4), (750, 4), (751, 5), (49, 1)])
def test_severity_exact_boundaries_on_a_lobe_mask(n_inf: int, expected: int) -> None:
    """A 1000-voxel lobe with exactly 5/25/50/75 % infected, through scan_metrics (the four other
    lobes are clear)."""
    shape = (10, 10, 14)
    lungs = np.zeros(shape, np.uint8)
    lungs[:, :, :11] = 1
    lungs[:, :, 12:13] = 2
    lobes = np.zeros(shape, np.uint8)
    lobes[:, :, :10] = 1
    lobes[:, :5, 10], lobes[:, 5:, 10] = 2, 3
    lobes[:, :5, 12], lobes[:, 5:, 12] = 4, 5
    inf = np.zeros(shape, np.uint8)
    inf.reshape(-1)[np.flatnonzero((lobes == 1).reshape(-1))[:n_inf]] = 1
    vol = Volume(array=np.full(shape, -800, np.int16), spacing=(1.3, 0.7, 0.7))
    df = M.scan_metrics(vol, Segmentation(lungs=lungs, infection=inf, lobes=lobes))
    assert _value(df, "RUL", M.SEVERITY) == expected
    assert _value(df, "whole", M.SEVERITY) == expected


def test_lesions_count_and_minimum_volume() -> None:
    shape = (20, 40, 40)
    lungs = np.ones(shape, np.uint8)
    inf = np.zeros(shape, np.uint8)
    inf[2:7, 2:12, 2:12] = 1  # 500 voxels = 0.5 mL at 1 mm^3
    inf[10:13, 20:30, 20:30] = 2  # 300 voxels = 0.3 mL
    inf[15, 35, 35] = 1  # 1 voxel: below MIN_LESION_ML, not a lesion
    inf[7, 12, 12] = 1  # diagonal neighbour of the first block: joins it (26-connectivity)
    vol = Volume(array=np.full(shape, -700, np.int16), spacing=(1.0, 1.0, 1.0))
    df = M.scan_metrics(vol, Segmentation(lungs=lungs, infection=inf))
    assert _value(df, "whole", M.LESION_COUNT) == 2
    assert _value(df, "whole", M.LARGEST_LESION) == pytest.approx(0.501)
    # no lobes -> no lobe regions and no severity rows
    assert not set(df.region) & {"RUL", "RML", "RLL", "LUL", "LLL"}
    assert M.SEVERITY not in set(df.metric)


def test_quality_flags() -> None:
    vol, seg = _box_case()  # tiny lungs (~2.9 mL): out of range; lungs not on first/last slice
    df = M.scan_metrics(vol, seg)
    assert _value(df, "whole", M.FLAG_LUNG_RANGE) == 1.0
    assert _value(df, "whole", M.FLAG_COVERAGE) == 0.0
    assert _value(df, "whole", M.FLAG_THICK) == 0.0
    assert _value(df, "whole", M.FLAG_COARSE) == 0.0  # 0.5 x 0.8 mm pixels
    assert _value(df, "whole", M.FLAG_SMALL_LUNG) == 0.0  # POI < 50 % everywhere

    lungs = seg.lungs.copy()
    lungs[0, 5, 5] = 1  # lung touches the first slice
    inf = seg.infection.copy()
    inf[7:12, 2:22, 13:21] = 2  # LLL fully consolidated, and LLL is tiny
    thick = Volume(array=vol.array, spacing=(6.0, 0.5, 0.8))
    df2 = M.scan_metrics(thick, Segmentation(lungs=lungs, infection=inf, lobes=seg.lobes))
    assert _value(df2, "whole", M.FLAG_COVERAGE) == 1.0
    assert _value(df2, "whole", M.FLAG_THICK) == 1.0
    assert _value(df2, "whole", M.FLAG_COARSE) == 0.0  # 0.5 x 0.8 mm pixels
    coarse = Volume(array=vol.array, spacing=(2.0, 3.5, 0.8))
    assert _value(M.scan_metrics(coarse, seg), "whole", M.FLAG_COARSE) == 1.0
    assert _value(df2, "LLL", M.FLAG_SMALL_LUNG) == 1.0
    assert _value(df2, "RUL", M.FLAG_SMALL_LUNG) == 0.0
    assert _value(df2, "whole", M.FLAG_SMALL_LUNG) == 1.0


def test_empty_lungs_give_nan_not_errors() -> None:
    shape = (5, 6, 7)
    z = np.zeros(shape, np.uint8)
    df = M.scan_metrics(Volume(array=np.zeros(shape, np.int16), spacing=(1, 1, 1)), Segmentation(lungs=z, infection=z))
    assert np.isnan(_value(df, "whole", M.POI))
    assert _value(df, "whole", M.LUNG_VOLUME) == 0.0
    assert _value(df, "whole", M.LESION_COUNT) == 0


def test_shape_mismatch_is_refused() -> None:
    z = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(ValueError):
        M.scan_metrics(Volume(array=np.zeros((3, 3, 4), np.int16), spacing=(1, 1, 1)), Segmentation(lungs=z, infection=z))


def test_a_lobe_missing_from_the_lobe_map_has_no_score() -> None:
    """A lobe map without a middle lobe (e.g. imported): RML is 'not measured', not 'clear', and
    the 0-25 total is missing rather than a sum that silently counts RML as 0."""
    vol, seg = _box_case()
    lobes = np.where(seg.lobes == 2, 1, seg.lobes).astype(np.uint8)
    df = M.scan_metrics(vol, Segmentation(lungs=seg.lungs, infection=seg.infection, lobes=lobes))
    assert np.isnan(_value(df, "RML", M.SEVERITY)) and np.isnan(_value(df, "RML", M.POI))
    assert np.isnan(_value(df, "whole", M.SEVERITY))
    assert _value(df, "RUL", M.SEVERITY) == 2  # 200 of 1400 voxels: 14 %
    assert _value(M.scan_metrics(vol, seg), "whole", M.SEVERITY) == 4  # all five lobes present


def test_a_much_smaller_lung_raises_the_asymmetry_flag() -> None:
    vol, seg = _box_case()  # right 2000, left 1600 voxels: ratio 0.8, normal
    assert M.quality_flags(vol, seg)[M.FLAG_ASYMMETRY] == 0.0
    lungs = seg.lungs.copy()
    lungs[7:12][lungs[7:12] == 2] = 0  # the left lower half left out (a consolidated lobe the mask missed)
    lungs[2:5][lungs[2:5] == 2] = 0
    assert M.quality_flags(vol, Segmentation(lungs=lungs, infection=seg.infection, lobes=None))[M.FLAG_ASYMMETRY] == 1.0
    one = np.where(seg.lungs == 1, 1, 0).astype(np.uint8)
    assert M.quality_flags(vol, Segmentation(lungs=one, infection=seg.infection, lobes=None))[M.FLAG_ASYMMETRY] == 1.0

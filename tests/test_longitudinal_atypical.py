"""Change vs baseline on atypical but valid serial scans (session 9 review; each test failed before)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

SHAPE, SPACING = (48, 56, 56), (4.0, 3.5, 3.5)


def _cut(vol: Volume, seg: Segmentation, a: int, b: int) -> tuple[Volume, Segmentation]:
    """Slices a..b of a scan (z runs feet -> head), origin moved so the anatomy stays in place."""
    origin = tuple(np.asarray(vol.origin, dtype=float) + np.array([0.0, 0.0, a * vol.spacing[0]]))
    return (Volume(np.ascontiguousarray(vol.array[a:b]), vol.spacing, origin, vol.direction, vol.meta),
            Segmentation(*(np.ascontiguousarray(x[a:b]) for x in (seg.lungs, seg.infection, seg.lobes))))


def test_follow_up_short_of_the_apex_passes_qa_when_aligned(tmp_path: Path) -> None:
    """An unchanged scan repeated with a field of view that stops ~4.5 cm (30 % of the lung
    height) short of the apex (a low-dose follow-up): the registration is exact where both scans
    have data and the change is right, yet the QA counts the baseline lung the follow-up never
    imaged as misregistration (Dice 0.84 < 0.90, surface 3.75 mm > 3 mm), so the pair is stored
    as failed and its correct change is never shown."""
    from covidtrack.change import NOT_IMAGED, change_map, change_metrics, warped_followup
    from covidtrack.phantom import make_phantom
    from covidtrack.register import register

    v0, t0 = make_phantom(3, shape=SHAPE, spacing=SPACING, severity=0.8)
    s0 = Segmentation(t0.lungs, t0.infection, t0.lobes)
    z = np.where(t0.lungs.any(axis=(1, 2)))[0]
    top = int(z.max() - 0.3 * (z.max() - z.min()))  # the follow-up misses the top 30 % of the lung height
    v1, s1 = _cut(v0, s0, 0, top)
    reg = register(v0, s0, v1, s1, tmp_path / "pair", syn_iterations=(40, 20))
    inf, imaged = warped_followup(reg.warp_labels(s1.infection, outside=NOT_IMAGED))
    cm = change_map(s0.infection, inf, lungs=s0.lungs, imaged=imaged)
    v = change_metrics(cm, s0.lobes, v0.spacing, lungs=s0.lungs, imaged=imaged,
                       baseline_infection=s0.infection).set_index(["region", "metric"])["value"]
    # the change itself is right: nothing new, nothing resolved where the follow-up has data
    assert v["whole", "new_ml"] < 1.0 and v["whole", "resolved_ml"] < 1.0
    assert v["whole", "not_imaged_lung_ml"] > 100.0
    # ... and the lungs the follow-up imaged sit exactly on the baseline's
    warped_lungs = reg.warp_labels(s1.lungs, outside=NOT_IMAGED)
    seen = warped_lungs != NOT_IMAGED
    inside = (s0.lungs > 0) & seen
    dice_seen = 2 * np.sum(inside & (warped_lungs == s0.lungs)) / (inside.sum() + np.sum((warped_lungs > 0) & seen & (warped_lungs != NOT_IMAGED)))
    assert dice_seen > 0.97
    assert reg.ok, f"valid short follow-up refused by QA: {reg.qa.problems}"


def test_a_failed_pair_whose_masks_were_corrected_since_is_stale_not_failed(covidtrack_home: Path, monkeypatch) -> None:  # noqa: ANN001
    """A pair failed QA; then the follow-up's segmentation was corrected without re-registering
    (`hitl import --no-register`, or a new model + `hitl resegment`). The stored QA verdict is
    about masks no longer shown, yet pair_status still reads "failed QA": the notes give no fix,
    and the Patient page offers its "Update the change vs baseline now" button only for stale
    or missing pairs, so the pair can never be redone from the dashboard."""
    import covidtrack.register as reg_mod
    from covidtrack import longitudinal
    from covidtrack.hitl import corrections
    from covidtrack.phantom import make_series
    from covidtrack.report.load import change_notes
    from covidtrack.store import Store
    from test_register import _store_scan  # the store-flow tests' helper (tests/ is on the path)

    (v0, t0), (v1, t1) = make_series(3, n_timepoints=2, shape=SHAPE, spacing=SPACING)
    with Store.open() as store:
        _store_scan(store, "P1", dt.date(2026, 3, 10), v0, Segmentation(t0.lungs, t0.infection, t0.lobes))
        s2 = _store_scan(store, "P1", dt.date(2026, 3, 15), v1, Segmentation(t1.lungs, t1.infection, t1.lobes))
        monkeypatch.setattr(reg_mod, "QA_MIN_LUNG_DICE", 1.01)  # this registration fails its QA
        assert not longitudinal.register_followup(store, s2).ok
        monkeypatch.undo()
        assert longitudinal.pair_status(store, "P1") == {s2: longitudinal.FAILED}
        # the follow-up's mask is corrected (no re-registration yet)
        cleared = np.zeros_like(t1.infection)
        corrections.save_correction(store, s2, cleared, corrections.effort_between(t1.infection, cleared), "tester")
        status = longitudinal.pair_status(store, "P1")
        assert status == {s2: longitudinal.STALE}, f"pair made from masks no longer shown reads {status}"
        assert "register --patient P1" in change_notes(store, "P1")[0]



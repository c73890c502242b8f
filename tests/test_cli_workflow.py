"""The command-line workflow of a research team, on the steps an end-to-end review found wrong
(session 9; each test failed before): a correction imported after `hitl export`, `--patient`
given an alias, the lung mask imported as infection, an export that left follow-ups out without a
word, `register --all` on a folder without a store, a PDF that denied registrations it called
out of date."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidtrack.__main__ import main
from covidtrack.labels import GGO
from covidtrack.store import Store
from test_hitl import small_store  # noqa: F401 - the fixture (tests/ is on the path)


def _tiny_active_model() -> str:
    from test_hitl import make_tiny_model  # tests/ is on the path

    return make_tiny_model().version


# --- 1. hitl import after hitl export: the correction is recorded against the wrong start -----
def test_cli_import_of_an_exported_correction_starts_from_that_correction(small_store: list[str], tmp_path: Path) -> None:
    """`hitl export` hands out the ACTIVE masks (a correction once there is one); `hitl import`
    then records the new correction as starting from the latest MODEL output. The second
    After a promoted model's `hitl resegment` (the README's cycle) that is the NEW model's output,
    which nobody reviewed: the chain to the first reviewer's correction is lost, voxels_changed is
    counted against the new model, and agreement attributes the correction to the new model."""
    from covidtrack.hitl import agreement
    from covidtrack.io import load_mask, save_mask

    scan = small_store[0]
    with Store.open() as store:
        volume = store.load_volume(scan)
        model = store.load_segmentation(scan, "model")
    # reviewer AB: adds a slice of GGO to the model output
    first = model.infection.copy()
    z = int(np.nonzero(model.lungs.any(axis=(1, 2)))[0].mean())
    first[z][(model.lungs[z] > 0) & (first[z] == 0)] = GGO
    save_mask(first, volume, tmp_path / "ab.nii.gz")
    assert main(["hitl", "import", scan, str(tmp_path / "ab.nii.gz"), "--author", "AB", "--no-register"]) == 0
    with Store.open() as store:
        first_seg = store.corrections(scan)["seg_id"].iloc[-1]

    # a new model is promoted and the stored scans are re-segmented (the README's HITL cycle)
    _tiny_active_model()
    with Store.open() as store:
        from covidtrack.hitl import retrain

        retrain.resegment(store)
        original_model_version = "synthetic-infection/v0"

    # reviewer CD exports the scan (the active masks = AB's correction), changes ONE voxel, imports
    out = tmp_path / "cd"
    assert main(["hitl", "export", scan, str(out)]) == 0
    exported = load_mask(out / "infection.nii.gz", volume)
    assert np.array_equal(exported, first)
    second = exported.copy()
    zz, yy, xx = np.argwhere(second > 0)[0]
    second[zz, yy, xx] = 0
    save_mask(second, volume, out / "infection.nii.gz")
    assert main(["hitl", "import", scan, str(out / "infection.nii.gz"), "--author", "CD", "--no-register"]) == 0

    with Store.open() as store:
        rows = store.corrections(scan)
        table = agreement.agreement_table(store).set_index("scan_id")
    last = rows.iloc[-1]
    problems = []
    if last["original_seg_id"] != first_seg:
        problems.append(f"started from {last['original_seg_id']} (latest model output), not AB's correction {first_seg}")
    if table.loc[scan, "model_version"] != original_model_version:
        problems.append(f"AB corrected {original_model_version}'s output; agreement says {table.loc[scan, 'model_version']}")
    assert not problems, "; ".join(problems)


# --- 2. ingest --patient with an alias or key the other commands accept -------------------------
def test_ingest_with_an_existing_alias_as_patient_does_not_create_a_new_patient(covidtrack_home: Path, tmp_path: Path) -> None:
    """`report/register --patient` take a key, an alias or a raw ID; `ingest --patient Pt-A` (an
    alias the Patients list shows) silently creates a second, anonymous patient instead."""
    from covidtrack.errors import InputError
    from covidtrack.pipeline import drain, ingest
    from tests.test_pipeline import synthetic_chest, truth_segmenter

    vol, _ = synthetic_chest()
    drain(ingest(vol, "MRN-001", "2020-03-14", alias="Pt-A", segmenter=truth_segmenter, register=False))
    arr = np.array(vol.array, copy=True)
    arr[0, 0, 0] = -999  # another scan (other content hash)
    follow = vol.__class__(array=arr, spacing=vol.spacing)
    with Store.open() as store:
        key = store.patients()["patient_key"].iloc[0]
    for typed in ("Pt-A", key):
        try:
            result = drain(ingest(follow, typed, "2020-03-20", segmenter=truth_segmenter, register=False))
        except InputError as err:  # refusing with a fix is fine too
            assert "alias" in str(err) or "key" in str(err)
            continue
        assert result.patient_key == key, f"--patient {typed!r} made a new patient {result.patient_key}"
    with Store.open() as store:
        assert len(store.patients()) == 1, store.patients()


# --- 3. hitl import accepts the wrong exported file (lungs.nii.gz) as the infection ------------
def test_importing_the_lung_mask_as_a_correction_is_refused_or_warned(small_store: list[str], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """lungs.nii.gz lies beside infection.nii.gz in the export and has the same values 1 / 2:
    importing it stores a correction with ~100 % POI and severity 25, silently, with no way to
    withdraw a correction short of removing the scan."""
    scan = small_store[0]
    out = tmp_path / "exp"
    assert main(["hitl", "export", scan, str(out)]) == 0
    code = main(["hitl", "import", scan, str(out / "lungs.nii.gz"), "--author", "AB", "--no-register"])
    captured = capsys.readouterr()
    with Store.open() as store:
        poi = store.metrics([scan], model_version="active")
    whole = poi[(poi["region"] == "whole") & (poi["metric"] == "poi")]["value"].iloc[0]
    assert code != 0 and "lung mask" in captured.err, f"stored silently: POI now {whole:.1f} %"


# --- 4. export leaves stale follow-ups out silently ---------------------------------------------
def test_export_of_a_stale_pair_is_not_silent(small_store: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """After a correction (or resegment) a pair is stale: the PDF says so with the command that
    refreshes it; `export` writes change_vs_baseline without that follow-up and says nothing."""
    from covidtrack import longitudinal

    scan_base, scan_fu = small_store
    with Store.open() as store:
        done = longitudinal.register_patient(store, store.scans()["patient_key"].iloc[0])
    assert done and all(r.ok for r in done)
    assert main(["export", str(tmp_path / "fresh")]) == 0
    fresh = pd.read_csv(tmp_path / "fresh" / "change_vs_baseline.csv")
    assert scan_fu in set(fresh["scan_id"])
    # a reviewer corrects the follow-up without re-registering: the pair is stale
    with Store.open() as store:
        seg = store.load_segmentation(scan_fu, "model")
    from covidtrack.io import save_mask

    with Store.open() as store:
        vol = store.load_volume(scan_fu)
    edited = seg.infection.copy()
    edited[edited > 0] = 0
    save_mask(edited, vol, tmp_path / "clear.nii.gz")
    assert main(["hitl", "import", scan_fu, str(tmp_path / "clear.nii.gz"), "--author", "AB", "--no-register"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "stale")]) == 0
    printed = capsys.readouterr()
    stale = pd.read_csv(tmp_path / "stale" / "change_vs_baseline.csv")
    said = scan_fu in printed.out + printed.err or "register" in printed.out + printed.err
    assert scan_fu in set(stale["scan_id"]) or said, "the follow-up vanished from the export without a word"


# --- 5. register --all in a folder without a store -------------------------------------------
def test_register_all_without_a_store_says_so(covidtrack_home: Path, capsys: pytest.CaptureFixture) -> None:
    """`patients` says 'no store here yet' (e.g. a mistyped COVIDTRACK_HOME); `register --all`
    creates an empty store there, prints nothing and exits 0."""
    code = main(["register", "--all"])
    captured = capsys.readouterr()
    assert code != 0 or captured.out.strip() or captured.err.strip(), "silent success on an empty folder"
    assert not (covidtrack_home / "covidtrack.duckdb").exists()


# --- 6. PDF: stale follow-ups are also called "no registered follow-up yet" --------------------
def test_patient_pdf_does_not_deny_registrations_it_calls_stale(small_store: list[str], tmp_path: Path) -> None:
    import subprocess

    from covidtrack import longitudinal
    from covidtrack.io import save_mask

    scan_base, scan_fu = small_store
    with Store.open() as store:
        key = store.scans()["patient_key"].iloc[0]
        assert all(r.ok for r in longitudinal.register_patient(store, key))
        vol = store.load_volume(scan_base)
        seg = store.load_segmentation(scan_base, "model")
    edited = seg.infection.copy()
    edited[edited > 0] = 0
    save_mask(edited, vol, tmp_path / "clear.nii.gz")
    assert main(["hitl", "import", scan_base, str(tmp_path / "clear.nii.gz"), "--author", "AB", "--no-register"]) == 0
    pdf = tmp_path / "p.pdf"
    assert main(["report", "--patient", key, "--out", str(pdf), "--engine", "matplotlib", "--no-images"]) == 0
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "change vs baseline not shown" in text
    assert "No registered follow-up yet" not in text, "the follow-up IS registered (stale), the PDF says both"

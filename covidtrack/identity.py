"""Does a new scan belong to the patient it is filed under? Checked at ingest, before segmenting.

A follow-up filed under the wrong patient (a mistyped manifest row, the wrong folder) silently
corrupts a trajectory: the "change" is then between two people. DICOM headers carry what is
needed to catch this without keeping identifying text: the PatientID is kept only as a salted
hash (:func:`covidtrack.io.patient_key`, stored in each scan's meta as ``source_patient_key``)
and PatientSex as one letter.

A new scan conflicts when

- its PatientID hash differs from the one of a stored scan of the same patient;
- its PatientSex (M / F) differs from a stored scan of the same patient;
- its PatientID hash equals the one of another patient's scans (the same person filed twice).

Scans without a PatientID or sex (NIfTI, NRRD, MHA, anonymised DICOM) cannot be checked and
never conflict. A conflict stops the ingest (:class:`~covidtrack.errors.InputError`) unless the
caller accepts it (records merged at another hospital, a corrected sex); the scan then carries
an ``identity_note`` in its meta, which raises :data:`covidtrack.metrics.FLAG_IDENTITY` on every
segmentation of it, so the patient page and the PDF say to check it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from covidtrack.volume import ScanMeta

if TYPE_CHECKING:
    from covidtrack.store import Store

SEXES_COMPARED = ("M", "F")  # "O" (other) and "" say too little to call a difference


def conflicts(store: "Store", patient_key: str, meta: ScanMeta) -> list[str]:
    """What in ``meta`` contradicts the stored scans (one sentence each; empty when nothing does).

    ``patient_key`` is the key the new scan is being filed under; ``meta.patient_key`` and
    ``meta.patient_sex`` are the file's own (DICOM) values.
    """
    source_key, sex = meta.patient_key, meta.patient_sex
    if not source_key and sex not in SEXES_COMPARED:
        return []
    scans = store.identity_candidates(patient_key, source_key)
    out: list[str] = []
    seen_key = seen_sex = seen_other = False
    for row in scans.itertuples(index=False):
        stored = json.loads(row.meta or "{}")
        if stored.get("identity_note"):
            continue  # a scan accepted despite a conflict is no reference for the next one
        stored_key, stored_sex = stored.get("source_patient_key", ""), stored.get("patient_sex", "")
        date = str(row.study_date)[:10]
        name = row.alias if isinstance(row.alias, str) and row.alias else row.patient_key
        if row.patient_key == patient_key:
            if source_key and stored_key and stored_key != source_key and not seen_key:
                out.append(f"its DICOM PatientID differs from that of this patient's scan {row.scan_id} ({date})")
                seen_key = True
            if sex in SEXES_COMPARED and stored_sex in SEXES_COMPARED and sex != stored_sex and not seen_sex:
                out.append(f"its DICOM PatientSex ({sex}) differs from that of this patient's scan {row.scan_id} "
                           f"({date}: {stored_sex})")
                seen_sex = True
        elif source_key and stored_key == source_key and not seen_other:
            out.append(f"its DICOM PatientID is that of another patient, {name} (scan {row.scan_id}, {date})")
            seen_other = True
    return out


FIX = ("check that the scan belongs to this patient (the manifest row, the folder, the --patient ID); "
       "if it does (records merged, ID or sex corrected), ingest it again with --accept-other-id "
       "(or tick 'accept a different DICOM identity' on the Import page): it is then stored and flagged")

"""Read what the dashboard and the reports show from the :class:`~covidtrack.store.Store`.

The store keeps all SQL; this module only reshapes its frames into the long frames of
:mod:`covidtrack.report.data` and assembles the aligned follow-up series (each follow-up warped
into its baseline's grid with the stored registration).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage

from covidtrack.errors import CovidtrackError, StoreError
from covidtrack import metrics
from covidtrack.report.data import COHORT_COLUMNS, FLAG_MESSAGES, NO_ARM, M, PatientHeader, header_from_frame
from covidtrack.report.viewer import AlignedSeries

if TYPE_CHECKING:
    from covidtrack.report.pdf import PatientReportData
    from covidtrack.store import Store

log = logging.getLogger(__name__)

# Metrics the cohort views need: fetching only these keeps a 1,000-patient cohort small.
# The quality flags and resolutions (whole lung only, a few rows per scan) feed the Patients list's
# "check" column.
COHORT_METRICS: tuple[str, ...] = (M.POI, M.INFECTION_ML, M.SEVERITY, M.GGO_ML, M.CONS_ML, *FLAG_MESSAGES,
                                   metrics.SLICE_MM, metrics.PIXEL_MM)

# Change metric names written by the longitudinal step, mapped to the report's columns.
CHANGE_COLUMNS = {"new": "new_ml", "resolved": "resolved_ml", "persistent": "persistent_ml"}


def _label(alias: object, key: str) -> str:
    return str(alias) if isinstance(alias, str) and alias.strip() else key


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Store rows -> the cohort frame (``label`` = alias or key, ``study_date`` as datetime64)."""
    if df.empty:
        return pd.DataFrame(columns=list(COHORT_COLUMNS))
    out = df.copy()
    out["label"] = [_label(a, k) for a, k in zip(out["alias"], out["patient_key"])]
    out["arm"] = out["arm"].fillna(NO_ARM).astype(str)
    out["study_date"] = pd.to_datetime(out["study_date"])
    out["day"] = out["day"].astype(int)
    return out[list(COHORT_COLUMNS)]


def cohort_frame(store: "Store", arms: list[str] | None = None, metrics: tuple[str, ...] | None = COHORT_METRICS) -> pd.DataFrame:
    """Long rows of every patient (active model version), see :mod:`covidtrack.report.data`.
    ``arms`` may name ``NO_ARM`` for the patients stored without an arm."""
    in_sql = arms if arms is None or NO_ARM not in arms else None  # NULL in the store, named only here
    frame = _normalise(store.cohort_metrics(arms=in_sql, metrics=list(metrics) if metrics else None))
    return frame if in_sql is not None or arms is None else frame[frame["arm"].isin(arms)].reset_index(drop=True)


def patient_frame(store: "Store", patient_key: str) -> pd.DataFrame:
    """Every metric row of one patient (active model version)."""
    return _normalise(store.patient_metrics(patient_key))


def patient_header(store: "Store", patient_key: str, frame: pd.DataFrame | None = None) -> PatientHeader:
    pats = store.patients()
    row = pats[pats["patient_key"] == patient_key]
    if row.empty:
        raise StoreError(f"{store.path}: patient {patient_key} not found. Fix: pick one from the Patients page or `python -m covidtrack patients`")
    frame = patient_frame(store, patient_key) if frame is None else frame
    arm = row["arm"].iloc[0]
    return header_from_frame(
        patient_key, _label(row["alias"].iloc[0], patient_key), "" if pd.isna(arm) else str(arm), frame
    )


def change_table(store: "Store", patient_key: str, status: dict[str, str] | None = None) -> pd.DataFrame:
    """New / resolved / persistent infection (mL) per follow-up and region.

    Columns ``date``, ``scan_id``, ``region``, ``new_ml``, ``resolved_ml``, ``persistent_ml``,
    one row per follow-up scan and region (two follow-ups on one date stay two rows). Only pairs
    registered to the current baseline from the segmentations shown now are included
    (:func:`covidtrack.longitudinal.pair_status`); :func:`change_notes` says what is left out.
    Metric names ending in ``new``/``resolved``/``persistent`` (with or without a
    ``_volume``/``_ml`` suffix) are recognised. ``status``: :func:`pair_status` when the caller
    has it already.
    """
    from covidtrack.longitudinal import CURRENT, pair_status

    rows = store.change_metrics(patient_key)
    cols = ["date", "scan_id", "region", *CHANGE_COLUMNS.values()]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    status = pair_status(store, patient_key) if status is None else status
    current = [sid for sid, state in status.items() if state == CURRENT]
    rows = rows[(rows["fixed_scan"] == store.baseline_scan(patient_key)) & rows["moving_scan"].isin(current)]
    kind = rows["metric"].str.replace(r"(_volume|_ml)$", "", regex=True).str.split("_").str[-1]
    rows = rows.assign(kind=kind)
    rows = rows[rows["kind"].isin(list(CHANGE_COLUMNS))]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    wide = rows.pivot_table(index=["moving_date", "moving_scan", "region"], columns="kind", values="value",
                            aggfunc="first").reset_index()
    wide.columns.name = None
    wide = wide.rename(columns={"moving_date": "date", "moving_scan": "scan_id", **CHANGE_COLUMNS})
    wide["date"] = pd.to_datetime(wide["date"]).dt.date.astype(str)
    for c in CHANGE_COLUMNS.values():
        if c not in wide:
            wide[c] = np.nan
    return wide[cols].sort_values(["date", "scan_id"], kind="stable").reset_index(drop=True)


def lesion_table(store: "Store", patient_key: str, status: dict[str, str] | None = None) -> pd.DataFrame:
    """Lesions tracked from the baseline to each current follow-up (:func:`covidtrack.change.lesion_tracks`
    on the stored change map, the baseline's lobes and the baseline infection the follow-up did
    not image): columns ``date``, ``scan_id`` and :data:`covidtrack.change.LESION_COLUMNS`. Only
    pairs shown as current (as :func:`change_table`); ``attrs["pairs"]`` lists every analysed
    follow-up as ``(date, scan_id)``, also those with no lesion at all."""
    from covidtrack.change import LESION_COLUMNS, lesion_tracks
    from covidtrack.longitudinal import CURRENT, pair_status
    from covidtrack.store import read_canonical

    cols = ["date", "scan_id", *LESION_COLUMNS]
    empty = pd.DataFrame(columns=cols)
    empty.attrs["pairs"] = []
    status = pair_status(store, patient_key) if status is None else status
    current = [sid for sid, state in status.items() if state == CURRENT]
    if not current:
        return empty
    base = store.baseline_scan(patient_key)
    regs = store.registrations(patient_key)
    regs = regs[(regs["fixed_scan"] == base) & regs["moving_scan"].isin(current) & regs["ok"].astype(bool)]
    base_seg = store.segmentation(base, "active")

    def optional(path: Path | None) -> np.ndarray | None:
        try:  # a lost lobe file costs the lobe names, not the table (the viewer copes the same way)
            return read_canonical(Path(path))[0] if path else None
        except StoreError as err:
            log.warning("lesion table of %s without %s: %s", patient_key, path, err)
            return None

    lobes, base_inf, base_lungs = optional(base_seg.lobes_path), optional(base_seg.infection_path), optional(base_seg.lungs_path)
    dates = store.scans(patient_key).set_index("scan_id")["study_date"]
    parts, pairs = [], []
    for _, row in regs.sort_values("moving_date").iterrows():
        path = row.get("change_map_path")
        if path is None or not Path(path).exists():
            continue
        change, spacing, _, _ = read_canonical(Path(path))
        # baseline infection in the baseline lungs that the change map leaves at 0: not imaged by
        # the follow-up (imaged infection there is always resolved or persistent)
        unseen = None
        if base_inf is not None and base_lungs is not None and base_inf.shape == change.shape == base_lungs.shape:
            unseen = (base_inf > 0) & (base_lungs > 0) & (change == 0)
        tracks = lesion_tracks(change, lobes if lobes is not None and lobes.shape == change.shape else None, spacing,
                               not_imaged=unseen)
        date = str(pd.to_datetime(dates[row["moving_scan"]]).date())
        pairs.append((date, row["moving_scan"]))
        parts.append(tracks.assign(date=date, scan_id=row["moving_scan"]))
    out = pd.concat(parts, ignore_index=True)[cols] if parts else empty.copy()
    out = out.sort_values(["date", "scan_id", "lesion"], kind="stable").reset_index(drop=True)
    out.attrs["pairs"] = sorted(pairs)
    return out


def change_notes(store: "Store", patient_key: str, status: dict[str, str] | None = None, with_fix: bool = True) -> list[str]:
    """One line per follow-up whose change vs the baseline is not shown, saying why and (with
    ``with_fix``) the command that updates it; ``status``: :func:`pair_status` when the caller
    has it already."""
    from covidtrack.longitudinal import CURRENT, FAILED, MISSING, STALE, pair_status

    dates = {str(r.scan_id): str(pd.Timestamp(r.study_date).date()) for r in store.scans(patient_key).itertuples()}
    why = {
        STALE: "its segmentation or the baseline's changed since it was registered (a correction or a new model), "
               "or an older covidtrack measured it",
        FAILED: "its registration to the baseline failed the quality check",
        MISSING: "it has not been registered to the baseline",
    }
    fix = f"run `python -m covidtrack register --patient {patient_key}`"
    status = pair_status(store, patient_key) if status is None else status
    notes = [f"{dates.get(sid, sid)}: change vs baseline not shown: {why[state]}" + ("" if state == FAILED or not with_fix else f"; {fix}")
             for sid, state in status.items() if state != CURRENT]
    return notes + coverage_notes(store, patient_key, [sid for sid, state in status.items() if state == CURRENT], dates)


NOT_IMAGED_NOTE_ML = 5.0  # a follow-up that leaves out this much baseline lung gets a note


def coverage_notes(store: "Store", patient_key: str, current: list[str], dates: dict[str, str]) -> list[str]:
    """One line per shown follow-up that does not cover part of the baseline lung (a shorter
    field of view): there, infection is counted as neither resolved nor persistent."""
    rows = store.change_metrics(patient_key)
    if rows.empty or not current:
        return []
    rows = rows[(rows["fixed_scan"] == store.baseline_scan(patient_key)) & rows["moving_scan"].isin(current)
                & (rows["region"] == "whole")]
    out = []
    for sid, group in rows.groupby("moving_scan", sort=False):
        values = dict(zip(group["metric"], group["value"]))
        lung = float(values.get("not_imaged_lung_ml", 0.0) or 0.0)
        if lung < NOT_IMAGED_NOTE_ML:
            continue
        inf = float(values.get("not_imaged_infection_ml", 0.0) or 0.0)
        out.append(f"{dates.get(str(sid), sid)}: this follow-up does not cover {lung:.0f} mL of the baseline lung; "
                   f"the baseline infection there ({inf:.1f} mL) is counted as neither resolved nor persistent")
    return sorted(out)


def _resize_to(arr: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Fallback for a follow-up without a usable registration: same field of view, baseline shape."""
    if arr.shape == shape:
        return arr
    zoom = [s / a for s, a in zip(shape, arr.shape)]
    out = ndimage.zoom(arr, zoom, order=order)
    # zoom may round one voxel off; pad/crop to the exact shape
    fixed = np.zeros(shape, dtype=arr.dtype) if order == 0 else np.full(shape, -1024, dtype=arr.dtype)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
    fixed[sl] = out[sl]
    return fixed


def _read_mask(path: Path | None) -> np.ndarray | None:
    if path is None or not Path(path).exists():
        return None
    from covidtrack.store import read_canonical

    return read_canonical(Path(path))[0].astype(np.uint8)


def aligned_series(store: "Store", patient_key: str, status: dict[str, str] | None = None) -> AlignedSeries:
    """All of a patient's scans in the baseline's canonical grid, for the viewer and the report.

    Each follow-up is warped with its stored registration (CT linear, labels generic-label) and
    paired with its stored change map. Warped arrays are kept in ``<store folder>/viewer_cache``
    (a few MB per follow-up) so a patient is warped once, not on every server start. Without a usable registration it is resized to the
    baseline's shape and flagged ``registered=False`` (the UI says "not aligned").
    """
    scans = store.scans(patient_key).sort_values(["study_date", "created_at"])
    if scans.empty:
        raise StoreError(f"{store.path}: patient {patient_key} has no scans. Fix: import a scan on the Import page")
    from covidtrack.longitudinal import CURRENT, pair_status

    regs = store.registrations(patient_key)
    status = pair_status(store, patient_key) if status is None else status
    base_id = str(scans["scan_id"].iloc[0])
    base_vol = store.load_volume(base_id)
    shape = base_vol.shape
    cts, infs, lungs, lobes, changes, registered, dates, days = [], [], [], [], [], [], [], []
    for _, scan in scans.iterrows():
        sid = str(scan["scan_id"])
        vol = base_vol if sid == base_id else store.load_volume(sid)
        try:
            seg = store.load_segmentation(sid, "active")
        except StoreError:
            log.warning("scan %s has no segmentation; shown without overlay", sid)
            seg = None
        ct = vol.array
        inf = seg.infection if seg is not None else np.zeros(vol.shape, np.uint8)
        lung = seg.lungs if seg is not None else np.zeros(vol.shape, np.uint8)
        lobe = seg.lobes if seg is not None else None
        change = None
        ok = sid == base_id
        if sid != base_id:
            # a pair that failed registration QA is shown "not aligned", never as if aligned; a
            # stale pair (masks changed since) is still aligned, but its change map is not shown
            reg_rows = regs[(regs["fixed_scan"] == base_id) & (regs["moving_scan"] == sid) & regs["ok"].astype(bool)]
            warped = None
            if len(reg_rows):
                seg_id = store.segmentation(sid, "active").seg_id if seg is not None else "none"
                cache = _cache_file(store, base_id, sid, str(reg_rows["reg_id"].iloc[0]), seg_id)
                warped = _read_cached(cache, shape)
                if warped is None:
                    warped = _warp_follow_up(reg_rows, ct, inf, lung, lobe)
                    if warped is not None:
                        _write_cached(cache, warped)
            if warped is not None:
                ct, inf, lung, lobe = warped
                change = _read_mask(reg_rows["change_map_path"].iloc[0]) if status.get(sid) == CURRENT else None
                if change is not None and change.shape != shape:
                    change = None
                ok = True
            else:
                ct = _resize_to(ct, shape, 1)
                inf, lung = _resize_to(inf, shape, 0), _resize_to(lung, shape, 0)
                lobe = _resize_to(lobe, shape, 0) if lobe is not None else None
        cts.append(np.asarray(ct, dtype=np.int16))
        infs.append(inf)
        lungs.append(lung)
        lobes.append(lobe)
        changes.append(change)
        registered.append(ok)
        dates.append(str(pd.Timestamp(scan["study_date"]).date()))
        days.append(int(scan["day"]))
    return AlignedSeries(
        dates=tuple(dates), days=tuple(days), spacing=base_vol.spacing, ct=tuple(cts), infection=tuple(infs),
        lungs=tuple(lungs), lobes=tuple(lobes), change=tuple(changes), registered=tuple(registered),
    )


VIEWER_CACHE = "viewer_cache"  # under the store's folder; one file per registered follow-up


def _cache_file(store: "Store", base_id: str, scan_id: str, reg_id: str, seg_id: str) -> Path:
    """Warped arrays of one follow-up, keyed by the registration and the segmentation shown: a new
    registration or a corrected mask gets a new name, so a stale file is never read."""
    return store.home / VIEWER_CACHE / f"{base_id}_{scan_id}--{reg_id}--{seg_id}.npz"


def _read_cached(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            out = (z["ct"], z["infection"], z["lungs"], z["lobes"] if "lobes" in z.files else None)
    except (OSError, ValueError, KeyError) as err:  # a damaged cache file is only a lost speed-up
        log.warning("viewer cache %s unreadable (%s); warping again", path.name, err)
        return None
    return out if out[0].shape == tuple(shape) else None


def _write_cached(path: Path, warped: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]) -> None:
    """Write atomically and drop this pair's older cache files (earlier registrations or masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = path.name.split("--", 1)[0]
    for old in path.parent.glob(f"{pair}--*.npz"):
        old.unlink(missing_ok=True)
    arrays = {"ct": warped[0], "infection": warped[1], "lungs": warped[2]}
    if warped[3] is not None:
        arrays["lobes"] = warped[3]
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(path)


def _warp_follow_up(
    reg_rows: pd.DataFrame, ct: np.ndarray, inf: np.ndarray, lung: np.ndarray, lobe: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Warp one follow-up with its stored registration; None when it cannot be used."""
    row = reg_rows.iloc[0]
    transforms = row["transforms"]
    if isinstance(transforms, dict) and transforms.get("registration") is not None:
        transforms = [transforms["registration"]]  # the saved Registration (covidtrack.longitudinal)
    paths = list(transforms.values()) if isinstance(transforms, dict) else list(transforms)
    paths = [Path(p) for p in paths if p is not None]
    if not paths:
        return None
    try:
        from covidtrack.register import Registration

        reg = Registration.load(paths[0] if paths[0].is_dir() or paths[0].name.endswith(".json") else paths[0].parent)
        warped_lobe = reg.warp_labels(lobe) if lobe is not None else None
        return reg.warp_image(ct), reg.warp_labels(inf), reg.warp_labels(lung), warped_lobe
    except (CovidtrackError, ValueError, OSError) as err:
        log.warning("registration %s unusable (%s); follow-up shown unaligned", row.get("reg_id", "?"), err)
        return None


def patient_report_data(store: "Store", patient_key: str, with_images: bool = True) -> "PatientReportData":
    """Everything :func:`covidtrack.report.pdf.write_patient_pdf` needs for one patient."""
    from covidtrack.longitudinal import pair_status
    from covidtrack.report.pdf import PatientReportData

    frame = patient_frame(store, patient_key)
    header = patient_header(store, patient_key, frame)
    status = pair_status(store, patient_key)  # once: images, table and notes agree on it
    aligned = aligned_series(store, patient_key, status) if with_images else None
    return PatientReportData(header=header, frame=frame, aligned=aligned, change=change_table(store, patient_key, status),
                             change_notes=tuple(change_notes(store, patient_key, status)),
                             lesions=lesion_table(store, patient_key, status))


def store_revision(store: "Store") -> tuple[int, ...]:
    """A cheap fingerprint that changes whenever rows are added or removed, a registration is
    redone (it replaces its row with a new id), a patient's alias or arm changes, or the active models change
    (cache key for the dashboard, which another process may have written to between two runs:
    a scan removed and another added keep the counts but change the ids)."""
    import zlib

    from covidtrack.store import active_model_names

    row = store._one("SELECT epoch_us(max(created_at)) FROM registrations")
    latest_reg = int(row[0]) if row and row[0] is not None else 0
    ids = store._one(
        "SELECT (SELECT hash(string_agg(concat_ws('|', patient_key, coalesce(alias, ''), coalesce(arm, '')), ',' "
        "ORDER BY patient_key)) FROM patients), "
        "(SELECT hash(string_agg(scan_id, ',' ORDER BY scan_id)) FROM scans), "
        "(SELECT hash(string_agg(seg_id, ',' ORDER BY seg_id)) FROM segmentations), "
        "(SELECT hash(string_agg(reg_id, ',' ORDER BY reg_id)) FROM registrations)"  # a redo gets a new id
    )
    models = zlib.crc32(",".join(sorted(active_model_names())).encode())
    return (*store.counts().values(), latest_reg, *(int(v or 0) for v in (ids or ())), models)


def resolve_patient(store: "Store", ident: str) -> str:
    """A patient key from a key or an alias (the CLI accepts either; raw IDs are never stored)."""
    pats = store.patients()
    if ident in set(pats["patient_key"]):
        return ident
    hit = pats[pats["alias"] == ident]
    if len(hit) == 1:
        return str(hit["patient_key"].iloc[0])
    if len(hit) > 1:
        raise StoreError(
            f"{store.path}: alias {ident!r} is shared by {len(hit)} patients ({', '.join(hit['patient_key'])}). "
            "Fix: pass the patient key instead (`python -m covidtrack patients` lists them)"
        )
    # a raw patient ID typed by the user: the store only knows its salted hash
    try:
        from covidtrack.io.dicom import patient_key as hash_key

        key = hash_key(ident)
        if key in set(pats["patient_key"]):
            return key
    except (ImportError, AttributeError):
        pass
    raise StoreError(
        f"{store.path}: no patient with key or alias {ident!r}. Fix: `python -m covidtrack patients` lists keys and aliases"
    )

"""Register a patient's follow-ups to the baseline and store the change of infection per lobe.

The baseline is the patient's earliest scan (``Store.baseline_scan``). For each follow-up:
load both canonical volumes and their active segmentations (the ones whose numbers the dashboard
shows: a human correction wins over the model output, then the active models' output) from the
store, :func:`covidtrack.register.register`, warp the follow-up infection
into the baseline, compute the change map and the change per region
(:mod:`covidtrack.change`), and store the registration and the change rows. A pair that fails
the registration QA is stored with ``ok = False`` and without change rows or change map.

Files: ``<store folder>/registrations/<fixed>_<moving>/`` holds the transforms,
``registration.json`` and ``change_map.nii.gz`` (uint8, baseline canonical grid). With the store
in ``COVIDTRACK_HOME`` (the default) that is ``$COVIDTRACK_HOME/registrations``. A registration
is computed in a ``.tmp-*`` folder and swapped in only when complete, so a failure never leaves a
half-written pair behind; the registration row and its change rows go in one transaction, and
the folder records the row's ``reg_id``, so a folder whose rows never landed is recomputed.

Idempotent: a pair whose stored registration was computed from the same two segmentations
(their ``seg_id``) is not recomputed unless ``force=True``. A pair whose segmentations changed
since (a correction, a new model) is *stale*: :func:`pair_status` says so, the report and the
viewer do not show its change, and :func:`register_patient` recomputes it. When an earlier scan arrives later
it becomes the baseline; :func:`register_patient` (and the pipeline, which calls
:func:`register_followup` for every other scan) then re-registers all follow-ups to it, and
pairs registered to the former baseline are removed.
"""

from __future__ import annotations

import contextvars
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidtrack.errors import StoreError
from covidtrack.events import ProgressCallback, emit

if TYPE_CHECKING:
    import pandas as pd

    from covidtrack.register import Registration
    from covidtrack.store import Store

CHANGE_MAP_FILE = "change_map.nii.gz"
# How change is measured; pairs measured by an older version read as stale. 2: baseline lung the
# follow-up did not image is left out of new / resolved / persistent (it used to count as resolved).
CHANGE_VERSION = 2
_ISOLATE: contextvars.ContextVar[bool] = contextvars.ContextVar("covidtrack_isolated_registration", default=False)
_PATIENT_LOCKS: dict[str, threading.RLock] = {}
_PATIENT_LOCKS_GUARD = threading.Lock()


@contextmanager
def _patient_lock(patient_key: str) -> Iterator[None]:
    """One registration run per patient at a time in this process: the dashboard registers from
    several threads (an import, a background update after a saved correction, a button), and two
    runs on one pair would compute it twice and race to store it. Re-entrant, so
    :func:`register_patient` can call :func:`register_followup` under it."""
    with _PATIENT_LOCKS_GUARD:
        lock = _PATIENT_LOCKS.setdefault(patient_key, threading.RLock())
    with lock:
        yield


@dataclass(frozen=True)
class FollowupResult:
    """What :func:`register_followup` did for one pair.

    ``reused``: the stored registration was still valid and nothing was recomputed;
    ``qa``: the QA figures stored with the registration (Dice 0..1, distances mm);
    ``folder``: where the transforms and the change map are.
    """

    fixed_scan: str
    moving_scan: str
    reg_id: str
    ok: bool
    qa: dict[str, float]
    folder: Path
    reused: bool


def registrations_root(store: "Store") -> Path:
    return Path(store.home) / "registrations"


def pair_folder(store: "Store", fixed_scan: str, moving_scan: str) -> Path:
    return registrations_root(store) / f"{fixed_scan}_{moving_scan}"


def _patient_of(store: "Store", scan_id: str) -> str:
    scans = store.scans()
    row = scans[scans["scan_id"] == scan_id]
    if row.empty:
        raise StoreError(f"{store.path}: scan {scan_id} not found. Fix: ingest it first (python -m covidtrack ingest PATH --patient ID)")
    return str(row["patient_key"].iloc[0])


def _stored_pair(store: "Store", patient_key: str, fixed_scan: str, moving_scan: str) -> dict[str, Any] | None:
    regs = store.registrations(patient_key)
    rows = regs[(regs["fixed_scan"] == fixed_scan) & (regs["moving_scan"] == moving_scan)]
    return None if rows.empty else rows.iloc[0].to_dict()


def _reusable(row: dict[str, Any] | None, fixed_seg: str, moving_seg: str) -> "Registration | None":
    """The stored registration if it was made from these segmentations and its files exist
    (a pair that failed QA is reused too: the same inputs give the same failure)."""
    from covidtrack.register import Registration

    if row is None:
        return None
    transforms = row["transforms"]
    path = transforms.get("registration") if isinstance(transforms, dict) else None
    change = row.get("change_map_path")
    # a pair that passed QA needs its change map; one that failed has none, and redoing it from
    # the same masks (seeded) would only fail again
    if path is None or (bool(row["ok"]) and (change is None or not Path(change).exists())):
        return None
    try:
        reg = Registration.load(path)
    except Exception:  # noqa: BLE001 - any unreadable leftover simply means "recompute"
        return None
    if reg.params.get("fixed_seg") != fixed_seg or reg.params.get("moving_seg") != moving_seg:
        return None
    if reg.params.get("reg_id", row["reg_id"]) != row["reg_id"]:
        return None  # the folder is newer than the row: interrupted before its rows were stored
    if bool(row["ok"]) and reg.params.get("change_version", 1) != CHANGE_VERSION:
        return None  # its change was measured the old way
    return reg


def _drop_stale(store: "Store", patient_key: str, baseline: str) -> None:
    """Remove pairs registered to a scan that is no longer the baseline (an earlier scan came
    in later). Needs ``Store.remove_registration``; older stores keep the rows, which the
    report ignores because it only reads pairs whose fixed scan is the baseline."""
    regs = store.registrations(patient_key)
    stale = regs[regs["fixed_scan"] != baseline]
    for _, row in stale.iterrows():
        remove = getattr(store, "remove_registration", None)
        if remove is None:
            return
        remove(str(row["fixed_scan"]), str(row["moving_scan"]))
        shutil.rmtree(pair_folder(store, str(row["fixed_scan"]), str(row["moving_scan"])), ignore_errors=True)


def register_followup(
    store: "Store", scan_id: str, progress: ProgressCallback | None = None, force: bool = False
) -> FollowupResult | None:
    """Register stored scan ``scan_id`` to its patient's baseline and store the change rows.

    Returns None when ``scan_id`` is itself the baseline (nothing to register). ``force``
    recomputes even when the stored registration is still valid.
    """
    key = _patient_of(store, scan_id)
    with _patient_lock(key):
        return _register_followup(store, key, scan_id, progress, force)


def _register_followup(
    store: "Store", key: str, scan_id: str, progress: ProgressCallback | None, force: bool
) -> FollowupResult | None:
    from covidtrack.store import new_reg_id

    baseline = store.baseline_scan(key)
    _drop_stale(store, key, str(baseline))
    if baseline is None or baseline == scan_id:
        return None
    fixed_rec = store.segmentation(baseline, "active")
    moving_rec = store.segmentation(scan_id, "active")
    final = pair_folder(store, baseline, scan_id)
    row = _stored_pair(store, key, baseline, scan_id)
    if not force:
        reg = _reusable(row, fixed_rec.seg_id, moving_rec.seg_id)
        if reg is not None and row is not None:
            emit(progress, "register", 1.0, "registration up to date", scan_id)
            return FollowupResult(baseline, scan_id, str(row["reg_id"]), bool(row["ok"]), dict(row["qa"]), final, True)

    emit(progress, "register", 0.0, "loading baseline and follow-up", scan_id)
    fixed, moving = store.load_volume(baseline), store.load_volume(scan_id)
    fixed_seg, moving_seg = store.load_segmentation(baseline, "active"), store.load_segmentation(scan_id, "active")
    reg_id = new_reg_id()
    work = registrations_root(store) / f".tmp-{baseline}_{scan_id}-{uuid.uuid4().hex[:8]}"
    try:
        emit(progress, "register", 0.1, "registering (affine + SyN), change map", scan_id)
        table = _run_compute(fixed, fixed_seg, moving, moving_seg, work, (fixed_rec.seg_id, moving_rec.seg_id), reg_id)
        # Swap the finished folder in (a crash before this line leaves only a .tmp-* folder).
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    from covidtrack.register import Registration

    reg = Registration.load(final)
    transforms: dict[str, Path] = {"registration": final / "registration.json"}
    transforms.update({f"forward_{i}": p for i, p in enumerate(reg.transform_paths)})
    transforms.update({f"inverse_{i}": p for i, p in enumerate(reg.inverse_transform_paths)})
    qa = _qa_dict(reg)
    emit(progress, "register", 0.95, "storing registration and change", scan_id)
    # A registration that failed QA is stored (with its figures, ok = False) so the user sees it,
    # but its change numbers and map are not: they would report misregistration as disease.
    store.add_registration(baseline, scan_id, transforms, qa, reg.ok, change_map=final / CHANGE_MAP_FILE if reg.ok else None,
                           change=table if reg.ok else table.iloc[0:0], reg_id=reg_id)
    emit(progress, "register", 1.0, "registered" if reg.ok else "registered, QA failed: " + "; ".join(reg.qa.problems), scan_id)
    return FollowupResult(baseline, scan_id, reg_id, reg.ok, qa, final, False)


def _compute_pair(
    fixed: Any, fixed_seg: Any, moving: Any, moving_seg: Any, work: Path, seg_ids: tuple[str, str], reg_id: str
) -> "pd.DataFrame":
    """Register, warp the follow-up's infection, compute the change map and the change per region;
    write everything into ``work`` (files only, no store) and return the change table."""
    from covidtrack.change import NOT_IMAGED, change_map, change_metrics, warped_followup
    from covidtrack.register import register
    from covidtrack.store import write_canonical

    reg = register(fixed, fixed_seg, moving, moving_seg, work)
    # baseline lung the follow-up did not image is unknown, not "resolved"
    warped_inf, imaged = warped_followup(reg.warp_labels(moving_seg.infection, outside=NOT_IMAGED))
    change = change_map(fixed_seg.infection, warped_inf, lungs=fixed_seg.lungs, imaged=imaged)
    table = change_metrics(change, fixed_seg.lobes, fixed.spacing, lungs=fixed_seg.lungs, imaged=imaged,
                           baseline_infection=fixed_seg.infection)
    write_canonical(work / CHANGE_MAP_FILE, fixed, change)
    _with_inputs(reg, seg_ids[0], seg_ids[1], reg_id)
    return table


@contextmanager
def isolated_registration() -> Iterator[None]:
    """Inside this block, registrations made by this thread (and by the worker threads the
    pipeline starts from it, which inherit the context) run their ANTs part in a child process.

    ANTsPy keeps Python's global interpreter lock during a registration (seconds to tens of
    seconds), so run in a thread of the dashboard's server it freezes every other thread: every
    page of every session. The dashboard's background jobs, its demo alignment and its Import
    page use this block; the command line does not need it. The store is still read and written
    by the calling thread only.
    """
    token = _ISOLATE.set(True)
    try:
        yield
    finally:
        _ISOLATE.reset(token)


def _run_compute(*args: Any) -> "pd.DataFrame":
    if not _ISOLATE.get():
        return _compute_pair(*args)
    return _compute_in_child(*args)


def _compute_in_child(*args: Any) -> "pd.DataFrame":
    """:func:`_compute_pair` in a fresh Python process (``python -m covidtrack._regchild``): its
    inputs and the change table travel as pickle files in a temporary folder outside the store.
    A plain subprocess, not multiprocessing: its spawn start re-runs the parent's main script,
    which under Streamlit is the dashboard itself."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    from covidtrack.errors import CovidtrackError

    job = Path(tempfile.mkdtemp(prefix="covidtrack-register-"))
    try:
        (job / "args.pkl").write_bytes(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
        env = os.environ.copy()  # the same settings (threads, home); covidtrack importable from anywhere
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        done = subprocess.run([sys.executable, "-m", "covidtrack._regchild", str(job)], capture_output=True, text=True,
                              env=env, check=False)
        if done.returncode != 0 or not (job / "table.pkl").exists():
            raise CovidtrackError(f"registration in a child process failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return pickle.loads((job / "table.pkl").read_bytes())
    finally:
        shutil.rmtree(job, ignore_errors=True)


def _with_inputs(reg: "Registration", fixed_seg: str, moving_seg: str, reg_id: str) -> "Registration":
    """Record which segmentations the registration was made from and the id of its row (for
    idempotence) and save."""
    from dataclasses import replace

    out = replace(reg, params={**reg.params, "fixed_seg": fixed_seg, "moving_seg": moving_seg, "reg_id": reg_id,
                               "change_version": CHANGE_VERSION})
    out.save()
    return out


def _qa_dict(reg: "Registration") -> dict[str, float]:
    from dataclasses import asdict

    qa = {k: float(v) for k, v in asdict(reg.qa).items()}
    qa["seconds"] = float(reg.seconds)
    return qa


def register_patient(
    store: "Store", patient_key: str, progress: ProgressCallback | None = None, force: bool = False
) -> list[FollowupResult]:
    """Register every follow-up of a patient to the current baseline (see module docstring)."""
    with _patient_lock(patient_key):
        return _register_patient(store, patient_key, progress, force)


def _register_patient(store: "Store", patient_key: str, progress: ProgressCallback | None, force: bool) -> list[FollowupResult]:
    scans = store.scans(patient_key)
    if scans.empty:
        raise StoreError(f"{store.path}: patient {patient_key} has no scans. Fix: check the ID (`python -m covidtrack patients` lists them)")
    baseline = store.baseline_scan(patient_key)
    follow = [str(s) for s in scans["scan_id"] if s != baseline]
    results = []
    for i, scan_id in enumerate(follow):

        def sub(ev: Any, i: int = i) -> None:
            emit(progress, ev.stage, (i + ev.fraction) / len(follow), ev.message, ev.item)

        res = register_followup(store, scan_id, progress=sub, force=force)
        if res is not None:
            results.append(res)
    if not follow:
        _drop_stale(store, patient_key, str(baseline))
    return results


#: :func:`pair_status` values
CURRENT, STALE, FAILED, MISSING = "current", "stale", "failed QA", "not registered"


def pair_status(store: "Store", patient_key: str) -> dict[str, str]:
    """Status of every follow-up of a patient against the current baseline, by scan id.

    ``current``: registered (QA passed) from the segmentations shown now; ``stale``: registered,
    but a segmentation of either scan changed since (a correction, a new active model), so its
    change numbers no longer match the shown masks; ``failed QA``; ``not registered``. Pairs
    registered to a former baseline count as not registered.
    """
    from covidtrack.register import Registration

    scans = store.scans(patient_key)
    baseline = store.baseline_scan(patient_key)
    if scans.empty or baseline is None:
        return {}
    regs = store.registrations(patient_key)
    regs = regs[regs["fixed_scan"] == baseline]
    active = {sid: _active_seg_id(store, sid) for sid in scans["scan_id"]}
    out: dict[str, str] = {}
    for sid in scans["scan_id"]:
        if sid == baseline:
            continue
        rows = regs[regs["moving_scan"] == sid]
        if rows.empty:
            out[sid] = MISSING
            continue
        row = rows.iloc[0]
        path = row["transforms"].get("registration") if isinstance(row["transforms"], dict) else None
        try:
            params = Registration.load(path).params if path is not None else {}
        except Exception:  # noqa: BLE001 - unreadable files: the pair must be redone
            params = {}
        same = params.get("fixed_seg") == active.get(baseline) and params.get("moving_seg") == active.get(sid)
        # the folder must be the row's: a process killed between swapping in a new registration
        # and storing its rows leaves the old rows next to the new folder
        same = same and params.get("reg_id", row["reg_id"]) == row["reg_id"]
        # a failed QA is a verdict on the masks it was made from: once those changed, the pair is
        # out of date (and can be redone from the dashboard), not "failed"
        if not same:
            out[sid] = STALE
        elif not bool(row["ok"]):
            out[sid] = FAILED  # (a failed pair has no change to have been measured the old way)
        else:
            out[sid] = CURRENT if params.get("change_version", 1) == CHANGE_VERSION else STALE  # measured the current way
    return out


def _active_seg_id(store: "Store", scan_id: str) -> str | None:
    try:
        return store.segmentation(scan_id, "active").seg_id
    except StoreError:
        return None


def refresh_after_change(store: "Store", scan_id: str, progress: ProgressCallback | None = None) -> list[FollowupResult]:
    """Bring the change vs baseline up to date after ``scan_id``'s segmentation changed (a saved
    correction): every stale pair of its patient is registered again (the baseline's change
    touches every follow-up, a follow-up's only its own pair); current pairs are left alone."""
    key = _patient_of(store, scan_id)
    return register_patient(store, key, progress=progress)


def forget_scan(store: "Store", scan_id: str, progress: ProgressCallback | None = None, register: bool = True) -> dict[str, Any]:
    """Remove a stored scan (:meth:`Store.remove_scan`) with its registration folders; when it
    was the baseline, the remaining follow-ups are registered to the new baseline (unless
    ``register`` is False). Returns what was removed and which follow-ups were registered."""
    key = _patient_of(store, scan_id)
    was_baseline = store.baseline_scan(key) == scan_id
    removed = store.remove_scan(scan_id)
    root = registrations_root(store)
    if root.is_dir():
        for folder in root.iterdir():
            if scan_id in folder.name:  # "<fixed>_<moving>" (and ".tmp-" leftovers); scan ids are unique
                shutil.rmtree(folder, ignore_errors=True)
    cache = Path(store.home) / "viewer_cache"
    if cache.is_dir():
        for f in cache.glob(f"*{scan_id}*"):
            f.unlink(missing_ok=True)
    registered: list[str] = []
    if was_baseline and register and not removed.get("patients"):
        registered = [r.moving_scan for r in register_patient(store, key, progress=progress)]
    return {"patient_key": key, "was_baseline": was_baseline, "removed": removed, "registered": registered}

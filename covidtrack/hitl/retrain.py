"""Fine-tune the active infection model on corrected scans; version, evaluate, promote, roll back.

Flow (the Models page and ``python -m covidtrack train infection --from-corrections``):

1. :func:`export_corrections` (in the process that owns the store): the latest correction of each
   corrected scan becomes axial training slices -- the CT in HU through the shared lung window
   (:func:`covidtrack.segment.intensity.window_hu`), cropped to the square around the lungs
   exactly as :meth:`InfectionModel.predict` sees a volume -- written to ``samples.npz`` in a job
   folder ``$COVIDTRACK_HOME/hitl/jobs/<run_id>/``. About one corrected patient in five
   (:func:`holdout_patients`, by a fixed hash of the patient key) is never trained on: those scans'
   slices go to ``validation.npz`` instead and score every run on the reviewers' own data.
2. :func:`start_retrain` launches ``python -m covidtrack.hitl.retrain JOB`` in the background
   (DuckDB allows one writer per file, so the job never opens the store). :func:`run_job`
   fine-tunes the active model (:func:`covidtrack.segment.train_infection.train` with
   ``init_weights`` and ``extra`` samples) on the corrected slices plus the original training
   slices, writing progress to ``status.json`` (the UI polls :func:`job_status`).
3. Both the old and the new model are scored on a fixed validation set (:func:`validation_set`:
   real MedSeg slices shipped in ``data/samples/hitl_validation``, held out of every fine-tuning
   run, plus deterministic phantom slices that no model trained on). The shipped model was
   trained on the real ones, and a fine-tuned model starts from its weights, so for both they
   measure retention, not generalisation (:func:`real_validation_seen`, recorded in the card).
   The held-out corrected scans are the unseen real part (minus any scan that a version in the
   base's lineage trained on before it was held out, :func:`scans_seen_by`);
   the result goes into the new card, and the version folder
   ``$COVIDTRACK_HOME/models/infection/vN`` appears atomically, immutable from then on.
4. Nothing changes for users until :func:`promote` (``modelstore.set_active`` + ``models`` row);
   :func:`rollback` restores the previous active version; :func:`resegment` re-runs the infection
   model on stored scans and adds segmentations whose metric rows carry the new version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidtrack.config import REPO_ROOT, SAMPLES, settings
from covidtrack.errors import ModelError, StoreError

if TYPE_CHECKING:
    import pandas as pd

    from covidtrack.modelstore import ModelRef
    from covidtrack.segment.infection import InfectionModel
    from covidtrack.store import Store

TASK = "infection"
#: Real validation slices shipped with the code (see its PROVENANCE.md).
VALIDATION_DIR = SAMPLES / "hitl_validation"
#: Phantom part of the validation set: seeds, grid (z, y, x) voxels and spacing mm, slices per phantom.
PHANTOM_SEEDS: tuple[int, ...] = (9101, 9102, 9103)
PHANTOM_SHAPE: tuple[int, int, int] = (32, 128, 128)
PHANTOM_SPACING: tuple[float, float, float] = (6.0, 1.5, 1.5)
PHANTOM_SLICES = 3
_PHANTOM_CACHE_KEY = "v1"  # bump when the phantom recipe above changes
#: Phantoms replayed during fine-tuning when the original training slices are not available.
REPLAY_SEEDS: tuple[int, ...] = (9201, 9202, 9203, 9204)
REPLAY_SLICES = 6
#: Share of corrected patients held out of every fine-tuning run; their corrected scans score
#: each run instead (the only real validation no model trained on). A fixed hash of the patient
#: key decides (:func:`holdout_patients`).
REVIEWED_HOLDOUT = 0.2


@dataclass(frozen=True)
class RetrainConfig:
    """A fine-tuning run. ``iterations`` are optimiser steps of ``batch_size`` slices;
    ``lr`` is lower than for training from scratch (the start is already good).
    ``max_slices_per_scan`` caps how many axial slices one corrected scan contributes (slices the
    reviewer changed first, then infected ones, then the rest evenly). ``original_images`` is a
    MedSeg-layout ``Imgs/`` folder of the original training slices (``None``: :func:`default_original_data`).
    ``holdout_fraction`` is the share of corrected patients kept for validation (:func:`holdout_patients`)."""

    iterations: int = 150
    batch_size: int = 8
    lr: float = 5e-4
    seed: int = 0
    max_slices_per_scan: int = 24
    original_images: Path | None = None
    use_original: bool = True
    version: str | None = None
    notes: str = ""
    holdout_fraction: float = REVIEWED_HOLDOUT

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["original_images"] = str(self.original_images) if self.original_images else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RetrainConfig":
        d = dict(d)
        d["original_images"] = Path(d["original_images"]) if d.get("original_images") else None
        return cls(**d)


@dataclass(frozen=True)
class RetrainJob:
    """A background run: its folder (``status.json``, ``log.txt``, ``config.json``) and process id."""

    run_id: str
    folder: Path
    pid: int | None

    @property
    def status_path(self) -> Path:
        return self.folder / "status.json"


# --- training slices from corrected scans --------------------------------------------------------
def pick_slices(lungs: np.ndarray, infection: np.ndarray, changed: np.ndarray | None, limit: int) -> list[int]:
    """Axial slice indices to train on: lung slices, the reviewer's changed slices first, then
    infected slices, then lung-only slices (spread evenly), at most ``limit``, sorted."""
    lung_z = np.nonzero(lungs.any(axis=(1, 2)))[0]
    if lung_z.size == 0 or limit <= 0:
        return []
    groups = []
    changed_z = set(np.nonzero(changed.any(axis=(1, 2)))[0]) if changed is not None else set()
    infected_z = set(np.nonzero(infection.any(axis=(1, 2)))[0])
    groups.append([z for z in lung_z if z in changed_z])
    groups.append([z for z in lung_z if z not in changed_z and z in infected_z])
    groups.append([z for z in lung_z if z not in changed_z and z not in infected_z])
    chosen: list[int] = []
    for g in groups:
        room = limit - len(chosen)
        if room <= 0:
            break
        if len(g) > room:  # evenly spread over the group, not the first slices of it
            g = [g[i] for i in np.linspace(0, len(g) - 1, room).round().astype(int)]
        chosen += [int(z) for z in g]
    return sorted(set(chosen))


def volume_slices(
    ct_hu: np.ndarray, lungs: np.ndarray, infection: np.ndarray, spacing: Sequence[float], size: int, zs: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``zs`` of a HU volume as the network sees them: lung window -> [0, 1], the square
    around the lungs (+ margin, mm-isotropic) resampled to ``size`` px; labels nearest-neighbour.

    Returns images (n, size, size) float32 and labels (n, size, size) uint8.
    """
    import torch

    from covidtrack.segment.infection import SquareView, resample_to_view
    from covidtrack.segment.intensity import window_hu

    if not len(zs):
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8)
    inside = lungs > 0
    lung_z = np.nonzero(inside.any(axis=(1, 2)))[0]
    view = SquareView.around_mask(inside[lung_z], (float(spacing[1]), float(spacing[2])))
    z = np.asarray(zs, dtype=int)
    img = resample_to_view(torch.from_numpy(window_hu(ct_hu[z]))[:, None], view, size)
    lab = resample_to_view(torch.from_numpy(infection[z].astype(np.float32))[:, None], view, size, mode="nearest")
    return img[:, 0].numpy().astype(np.float32), lab[:, 0].numpy().round().astype(np.uint8)


def latest_corrections(store: "Store") -> list[dict[str, Any]]:
    """The latest correction row of each corrected scan (older ones were superseded by the reviewer)."""
    df = store.corrections()
    if df.empty:
        return []
    df = df.sort_values("created_at").groupby("scan_id", sort=False).tail(1)
    return df.to_dict("records")


def holdout_patients(patient_keys: Sequence[str], fraction: float = REVIEWED_HOLDOUT) -> set[str]:
    """The corrected patients whose scans are kept out of fine-tuning and used to score it.

    Each patient key is hashed to a number in [0, 1). A patient below ``fraction`` (about one in
    five by default) is always held out, whoever else was corrected, so it stays on its side from
    one run to the next. Chance alone would leave some stores without any (10 corrected patients:
    none below 0.2 one time in nine), so the patients with the lowest numbers are added up to
    ``floor(n * fraction)``. When every corrected patient would be held out (few patients), none
    is: a run needs corrections to learn from.
    """
    keys = sorted({str(k) for k in patient_keys}, key=lambda k: (_holdout_bucket(k), k))
    held = {k for k in keys if _holdout_bucket(k) < fraction}
    held |= set(keys[: int(len(keys) * fraction)])
    return set() if held == set(keys) else held


def _holdout_bucket(key: str) -> float:
    digest = hashlib.sha256(f"covidtrack-hitl-holdout:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_corrections(store: "Store", fraction: float = REVIEWED_HOLDOUT) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The latest correction of each corrected scan, split into (to train on, held out for validation)."""
    rows = latest_corrections(store)
    held = holdout_patients([r["patient_key"] for r in rows], fraction)
    return [r for r in rows if r["patient_key"] not in held], [r for r in rows if r["patient_key"] in held]


def _correction_slices(store: "Store", row: dict[str, Any], size: int, limit: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Training (or validation) slices of one corrected scan: images, corrected labels, slice indices."""
    from covidtrack.store import read_canonical

    scan_id = row["scan_id"]
    volume = store.load_volume(scan_id)
    corrected = read_canonical(Path(row["mask_path"]))[0].astype(np.uint8)
    original = store.segmentation_by_id(row["original_seg_id"]) if row.get("original_seg_id") else store.segmentation(scan_id, "model")
    lungs = read_canonical(original.lungs_path)[0].astype(np.uint8)
    model_inf = read_canonical(original.infection_path)[0].astype(np.uint8)
    zs = pick_slices(lungs, corrected, corrected != model_inf, limit)
    im, lab = volume_slices(volume.array, lungs, corrected, volume.spacing, size, zs)
    return im, lab, zs


def _write_slices(out: Path, parts: list[tuple[str, np.ndarray, np.ndarray, list[int]]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out, images=np.concatenate([p[1] for p in parts]), labels=np.concatenate([p[2] for p in parts]),
        scan=np.asarray([p[0] for p in parts for _ in p[3]]), z=np.asarray([z for p in parts for z in p[3]], dtype=np.int64),
    )


def export_corrections(
    store: "Store", out: Path, size: int, max_slices_per_scan: int = 24, holdout_fraction: float = REVIEWED_HOLDOUT,
    validation_out: Path | None = None,
) -> dict[str, Any]:
    """Write the training slices of every corrected scan to ``out`` (npz: images, labels, scan, z);
    the scans of held-out patients (:func:`holdout_patients`) go to ``validation_out`` instead
    (default ``validation.npz`` beside ``out``).

    Returns ``{"scans", "slices", "correction_ids", "held_out_scans", "held_out_slices",
    "held_out_patients"}``. Raises StoreError when nothing was corrected yet.
    """
    train_rows, held_rows = split_corrections(store, holdout_fraction)
    if not train_rows:
        raise StoreError(f"{store.path}: no corrected scans yet. Fix: correct scans on the Review page, or import a mask "
                         "corrected in 3D Slicer / ITK-SNAP with `python -m covidtrack hitl import SCAN_ID MASK --author AB`")
    train = [(r["scan_id"], *_correction_slices(store, r, size, max_slices_per_scan)) for r in train_rows]
    _write_slices(out, train)
    held = [(r["scan_id"], *_correction_slices(store, r, size, max_slices_per_scan)) for r in held_rows]
    if held:
        _write_slices(validation_out or out.with_name("validation.npz"), held)
    return {
        "scans": [r["scan_id"] for r in train_rows], "slices": sum(len(p[3]) for p in train),
        "correction_ids": [r["correction_id"] for r in train_rows],
        "held_out_scans": [r["scan_id"] for r in held_rows], "held_out_slices": sum(len(p[3]) for p in held),
        "held_out_correction_ids": [r["correction_id"] for r in held_rows],
        "held_out_patients": len({r["patient_key"] for r in held_rows}), "holdout_fraction": holdout_fraction,
    }


def scans_seen_by(base: "ModelRef") -> set[str]:
    """Corrected scans that ``base`` or a version it was fine-tuned from trained on (from the cards'
    ``hitl.corrected_scans``). A lineage that cannot be followed counts what it could read."""
    from covidtrack import modelstore

    seen: set[str] = set()
    ref, visited = base, set()
    while ref.name not in visited:
        visited.add(ref.name)
        h = ref.card().get("hitl") or {}
        seen |= {str(s) for s in h.get("corrected_scans") or ()}
        parent = h.get("base_version")
        if not parent:
            break
        try:
            ref = modelstore.get(TASK, str(parent).split("/")[-1])
        except ModelError:
            break
    return seen


def reviewed_items(path: Path, exclude_scans: Collection[str] = ()) -> list["ValItem"]:
    """Validation items (source "reviewed") from a job's ``validation.npz`` (held-out corrected
    scans, unit images as the network sees them), minus the scans in ``exclude_scans``."""
    exclude_scans = {str(s) for s in exclude_scans}
    if not Path(path).exists():
        return []
    with np.load(path, allow_pickle=False) as data:
        return [
            ValItem(f"reviewed-{str(s)[:12]}-z{int(z)}", im.astype(np.float32), lab.astype(np.uint8), "reviewed")
            for im, lab, s, z in zip(data["images"], data["labels"], data["scan"], data["z"])
            if str(s) not in exclude_scans
        ]


# --- the fixed validation set ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ValItem:
    """One validation slice: unit image in [0, 1], labels 0/1/2, source "real" (shipped MedSeg
    slices), "phantom" or "reviewed" (a held-out corrected scan of this site)."""

    name: str
    image: np.ndarray
    classes: np.ndarray
    source: str


def phantom_slices(seeds: Sequence[int] | None = None, per_phantom: int | None = None, size: int = 128) -> list[ValItem]:
    """Deterministic phantom slices (default: the validation ones, :data:`PHANTOM_SEEDS`): the most
    infected axial slices of small phantoms at their disease peak, cropped around the lungs like
    a real volume, ``size`` px square."""
    from covidtrack.phantom import make_phantom

    items = []
    for seed in PHANTOM_SEEDS if seeds is None else seeds:
        vol, truth = make_phantom(seed, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
        per_z = truth.infection.reshape(truth.infection.shape[0], -1).astype(bool).sum(axis=1)
        zs = sorted(int(z) for z in np.argsort(-per_z, kind="stable")[: PHANTOM_SLICES if per_phantom is None else per_phantom])
        im, lab = volume_slices(vol.array, truth.lungs, truth.infection.astype(np.uint8), vol.spacing, size, zs)
        items += [ValItem(f"phantom-{seed}-z{z}", im[i], lab[i], "phantom") for i, z in enumerate(zs)]
    return items


def validation_set(real_dir: Path | None | str = "default", with_phantoms: bool = True) -> list[ValItem]:
    """The fixed validation set: real slices held out of fine-tuning (canonical orientation, default
    :data:`VALIDATION_DIR`; ``None`` = none) + phantom slices.

    Phantom slices are cached in ``$COVIDTRACK_HOME/hitl/validation_phantoms.npz`` (generating
    them costs ~15 s on 2 cores).
    """
    from covidtrack.segment.intensity import unit_from_uint8
    from covidtrack.segment.slices import read_medseg_folder

    real_dir = VALIDATION_DIR if real_dir == "default" else real_dir
    items: list[ValItem] = []
    if real_dir is not None and Path(real_dir).is_dir():
        d = Path(real_dir)
        for s in read_medseg_folder(d / "Imgs", d / "GT", d / "GT_multiclass"):
            items.append(ValItem(f"real-{s.name}", unit_from_uint8(s.image), s.classes, "real"))  # type: ignore[arg-type]
    if with_phantoms:
        cache = settings().home / "hitl" / "validation_phantoms.npz"
        ph: list[ValItem] = []
        if cache.exists():
            data = np.load(cache, allow_pickle=False)
            if str(data["key"]) == _phantom_key():
                ph = [ValItem(str(n), im, lab, "phantom") for n, im, lab in zip(data["names"], data["images"], data["labels"])]
        if not ph:
            ph = phantom_slices()
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
            os.close(fd)
            np.savez_compressed(tmp, key=_phantom_key(), names=np.array([p.name for p in ph]),
                                images=np.stack([p.image for p in ph]), labels=np.stack([p.classes for p in ph]))
            os.replace(tmp, cache)
        items += ph
    return items


def _phantom_key() -> str:
    return f"{_PHANTOM_CACHE_KEY}:{PHANTOM_SEEDS}:{PHANTOM_SHAPE}:{PHANTOM_SPACING}:{PHANTOM_SLICES}"


def real_validation_seen(base: "ModelRef", names: Sequence[str] | None = None) -> bool:
    """Whether the real validation slices were training data of ``base`` or of a version it was
    fine-tuned from (then the fine-tuned model has seen them too, through its starting weights).

    Follows ``hitl.base_version`` to the version trained from scratch and checks its card's
    ``held_out`` list; a card that does not say counts as seen.
    """
    from covidtrack import modelstore

    wanted = {str(n) for n in (real_validation_names() if names is None else names)}
    ref, visited = base, set()
    while ref.name not in visited:
        visited.add(ref.name)
        card = ref.card()
        parent = (card.get("hitl") or {}).get("base_version")
        if not parent:
            data = card.get("training_data") or {}
            if not data.get("labelled_slices"):
                return False  # trained without real labelled slices
            return not wanted <= {str(n) for n in data.get("held_out") or ()}
        try:
            ref = modelstore.get(TASK, str(parent).split("/")[-1])
        except ModelError:
            return True  # the lineage cannot be followed: assume the worst
    return True


def real_validation_names(real_dir: Path | None | str = "default") -> list[str]:
    """File stems of the real validation slices (held out of every fine-tuning run's own data)."""
    real_dir = VALIDATION_DIR if real_dir == "default" else real_dir
    if real_dir is None or not (Path(real_dir) / "Imgs").is_dir():
        return []
    from covidtrack.segment.slices import list_images

    return list(list_images(Path(real_dir) / "Imgs"))


def evaluate(model: "InfectionModel", items: Sequence[ValItem]) -> dict[str, Any]:
    """Dice (infection), Dice GGO / consolidation, sensitivity, specificity per source and overall."""
    from covidtrack.segment.eval_slices import score_slice, summarize

    preds = model.predict_slices([it.image for it in items])
    scores = [score_slice(it.name, lab, it.classes > 0, it.classes) for it, (lab, _) in zip(items, preds)]
    out: dict[str, Any] = {"model": model.version, "n": len(items)}
    for source in ("real", "phantom", "reviewed"):
        sel = [s for s, it in zip(scores, items) if it.source == source]
        if sel:
            out[source] = summarize(sel)
    out["all"] = summarize(scores)
    out["per_item"] = {s.name: (None if np.isnan(s.dice) else round(s.dice, 4)) for s in scores}
    return out


def headline(evaluation: dict[str, Any]) -> dict[str, float | None]:
    """The few numbers the Models page shows: mean Dice on real, phantom, reviewed (held-out
    corrected scans; None when there are none) and all slices."""
    def mean(part: str) -> float | None:
        m = evaluation.get(part, {}).get("dice", {}).get("mean")
        return None if m is None else round(float(m), 4)

    return {"dice_real": mean("real"), "dice_phantom": mean("phantom"), "dice_reviewed": mean("reviewed"), "dice_all": mean("all")}


# --- original training data --------------------------------------------------------------------
def default_original_data() -> Path | None:
    """Where the original training slices (MedSeg layout) are, if anywhere.

    1. ``$COVIDTRACK_HOME/training/medseg/Imgs`` (a site copies them there; their licence is
       non-commercial, so they are not shipped in full);
    2. the development checkout's ``../shared/data/covid2d/medseg_train/Imgs``.
    Without either, fine-tuning replays phantom slices instead (recorded in the card).
    """
    for p in (settings().home / "training" / "medseg" / "Imgs", REPO_ROOT.parent / "shared" / "data" / "covid2d" / "medseg_train" / "Imgs"):
        if p.is_dir():
            return p
    return None


# --- job folder and status ---------------------------------------------------------------------
def jobs_dir() -> Path:
    return settings().home / "hitl" / "jobs"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)  # the UI polls the file: it must never see half of it


def _update_status(folder: Path, **fields: Any) -> dict[str, Any]:
    path = folder / "status.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields, updated_utc=_now())
    _write_json(path, data)
    return data


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own finished child (else it stays a zombie)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (e.g. another app process started it): fall back to a signal probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard_copies(folder: Path) -> None:
    """Remove a job's copies of patient images (samples.npz, validation.npz) and its unpublished model (staging/)."""
    shutil.rmtree(Path(folder) / "staging", ignore_errors=True)
    for name in ("samples.npz", "validation.npz"):
        (Path(folder) / name).unlink(missing_ok=True)


def job_status(folder: Path) -> dict[str, Any]:
    """The job's status: state (queued|running|done|failed), fraction 0..1, message, version,
    result (when done), error (when failed). A job whose process died without a result reads
    as failed, with the end of its log."""
    path = Path(folder) / "status.json"
    if not path.exists():
        return {"state": "missing", "fraction": 0.0, "message": f"{path} not found"}
    data = json.loads(path.read_text())
    if data.get("state") in ("queued", "running") and data.get("pid") and not _alive(int(data["pid"])):
        time.sleep(0.2)  # the process may have written its final status just now
        data = json.loads(path.read_text())
        if data.get("state") in ("queued", "running"):
            log = (Path(folder) / "log.txt")
            tail = log.read_text()[-1500:] if log.exists() else ""
            data = _update_status(Path(folder), state="failed", error=f"the training process ended without a result. Log:\n{tail}")
    if data.get("state") not in ("queued", "running") and not (data.get("pid") and _alive(int(data["pid"]))):
        # a process killed before it could clean up (a cancel during start-up, kill -9, a crash)
        _discard_copies(Path(folder))
    return data


def latest_job() -> RetrainJob | None:
    """The most recently started job (by folder name, which starts with a UTC timestamp)."""
    root = jobs_dir()
    if not root.is_dir():
        return None
    folders = sorted(p for p in root.iterdir() if (p / "status.json").exists())
    if not folders:
        return None
    st = json.loads((folders[-1] / "status.json").read_text())
    return RetrainJob(run_id=folders[-1].name, folder=folders[-1], pid=st.get("pid"))


def running_job() -> RetrainJob | None:
    job = latest_job()
    if job is not None and job_status(job.folder).get("state") in ("queued", "running"):
        return job
    return None


def prepare_job(store: "Store", cfg: RetrainConfig) -> RetrainJob:
    """Export the corrected slices and the config into a new job folder (in the store's process)."""
    from covidtrack import modelstore

    if running_job() is not None:
        raise ModelError(f"{jobs_dir()}: a retraining run is still going. Fix: wait for it to finish (Models page)")
    for old in sorted(jobs_dir().glob("*/status.json")):
        job_status(old.parent)  # removes image copies that an ended run could not clean up
    base = modelstore.active(TASK)
    card = base.card()
    size = int(card["net"]["input_size"])
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    folder = jobs_dir() / run_id
    folder.mkdir(parents=True)
    try:
        exported = export_corrections(store, folder / "samples.npz", size, cfg.max_slices_per_scan, cfg.holdout_fraction)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _write_json(folder / "config.json", {"config": cfg.to_json(), "base": {"version": base.version, "path": str(base.path),
                                          "shipped": base.shipped}, "exported": exported})
    held = (f"; {len(exported['held_out_scans'])} scan(s) of {exported['held_out_patients']} patient(s) held out for validation"
            if exported["held_out_scans"] else "")
    _update_status(folder, state="queued", fraction=0.0, message=f"{exported['slices']} slices from {len(exported['scans'])} corrected scans{held}",
                   base_version=base.name, started_utc=_now())
    return RetrainJob(run_id=run_id, folder=folder, pid=None)


def start_retrain(store: "Store", cfg: RetrainConfig = RetrainConfig()) -> RetrainJob:
    """Prepare a job and run it in a background process; returns at once (poll :func:`job_status`)."""
    job = prepare_job(store, cfg)
    log = open(job.folder / "log.txt", "ab")  # noqa: SIM115 - handed to the child process
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covidtrack.hitl.retrain", str(job.folder)],
            cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "COVIDTRACK_HOME": str(settings().home)},
            start_new_session=True,  # a Streamlit rerun or Ctrl-C in the app does not kill training
        )
    finally:
        log.close()
    _update_status(job.folder, pid=proc.pid)
    return replace(job, pid=proc.pid)


def cancel(job: RetrainJob) -> None:
    """Stop a running job (its partial output is discarded; no version is written)."""
    st = job_status(job.folder)
    pid = st.get("pid")
    if st.get("state") in ("queued", "running") and pid and _alive(int(pid)):
        os.kill(int(pid), signal.SIGTERM)
    _update_status(job.folder, state="failed", error="cancelled by the user")
    if not (pid and _alive(int(pid))):
        _discard_copies(job.folder)  # else the process does it on SIGTERM, or job_status once it is gone


# --- the job itself (background process or in-process for the CLI) -------------------------------
def _progress_log(folder: Path, echo: bool) -> Callable[[str], None]:
    """A ``log`` callback for train(): mirrors lines to log.txt/stdout and maps steps to a fraction."""
    import re

    pattern = re.compile(r"\[(teacher|student)\] step (\d+)/(\d+)")

    def log(line: str) -> None:
        if echo:
            print(line, flush=True)
        m = pattern.search(line)
        if m:
            frac = 0.10 + 0.75 * int(m.group(2)) / max(1, int(m.group(3)))
            _update_status(folder, state="running", fraction=round(frac, 3), message=line)

    return log


def run_job(folder: Path, echo: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate old and new, and write the new version folder. Returns the result dict
    (also stored in status.json). Never touches the store or the active pointer."""
    import torch

    from covidtrack import modelstore
    from covidtrack.segment.infection import InfectionModel, NetSpec
    from covidtrack.segment.train_infection import TrainConfig, train

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    cfg = RetrainConfig.from_json(meta["config"])
    base = modelstore.ModelRef(task=TASK, version=meta["base"]["version"], path=Path(meta["base"]["path"]), shipped=meta["base"]["shipped"])
    _update_status(folder, state="running", pid=os.getpid(), fraction=0.02, message="loading data")
    torch.set_num_threads(settings().threads)
    t0 = time.time()
    base_card = base.card()
    spec = NetSpec.from_json(base_card["net"])
    data = np.load(folder / "samples.npz", allow_pickle=False)
    extra = tuple((im, lab) for im, lab in zip(data["images"], data["labels"]))
    held = real_validation_names()
    images = cfg.original_images or (default_original_data() if cfg.use_original else None)
    replay_note = ""
    if images is not None:
        exclude = tuple(n for n in held if any((Path(images) / f"{n}{s}").exists() for s in (".jpg", ".jpeg", ".png")))
        parent = Path(images).parent
        masks = parent / "GT" if (parent / "GT").is_dir() else None
        multiclass = parent / "GT_multiclass" if (parent / "GT_multiclass").is_dir() else None
    else:
        exclude, masks, multiclass = (), None, None
        replay = phantom_slices(seeds=REPLAY_SEEDS, per_phantom=REPLAY_SLICES, size=spec.input_size)
        extra = extra + tuple((p.image, p.classes) for p in replay)
        replay_note = f"original training slices not found; replayed {len(replay)} phantom slices instead. "
    _update_status(folder, fraction=0.05, message=f"scoring the current model {base.name} on the validation set")
    seen = real_validation_seen(base, held)
    held_scans = [str(x) for x in meta["exported"].get("held_out_scans", [])]
    reviewed_seen = sorted(set(held_scans) & scans_seen_by(base))  # trained on before they were held out
    reviewed = reviewed_items(folder / "validation.npz", exclude_scans=reviewed_seen)
    val = validation_set() + reviewed
    old_eval = evaluate(InfectionModel.load(base), val)
    version = cfg.version or modelstore.next_version(TASK)
    staging = folder / "staging"
    tcfg = TrainConfig(
        images=Path(images) if images is not None else None, masks=masks, multiclass=multiclass, unlabeled=None,
        extra=extra, init_weights=base.weights, exclude=exclude, iterations=cfg.iterations, student_iterations=0,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, spec=spec, out_root=staging, version=version,
        notes=(f"Fine-tuned from {base.name} on {len(meta['exported']['scans'])} corrected scans "
               f"({meta['exported']['slices']} axial slices) by covidtrack.hitl.retrain. {replay_note}{cfg.notes}").strip(),
    )
    result = train(tcfg, log=_progress_log(folder, echo))
    _update_status(folder, fraction=0.9, message=f"scoring the new model {version} on the validation set")
    new_model = InfectionModel.load(result.ref)
    new_eval = evaluate(new_model, val)
    card = result.ref.card()
    card["hitl"] = {
        "base_version": base.name,
        "corrected_scans": meta["exported"]["scans"],
        "correction_ids": meta["exported"]["correction_ids"],
        "corrected_slices": meta["exported"]["slices"],
        "config": cfg.to_json(),
        "validation_set": {"real": [f"real-{n}" for n in held], "phantom_seeds": list(PHANTOM_SEEDS),
                           "real_seen_by_base": seen,
                           "note": "real slices from data/samples/hitl_validation, held out of this run's own training data"
                                   + (f"; but {base.name} (or a version it was fine-tuned from) was trained on them, and the new "
                                      "model starts from its weights: both have seen them, so the real-slice Dice measures "
                                      "whether fine-tuning keeps what the base model learned, not how it does on unseen "
                                      "slices. The phantom slices are unseen by both." if seen else
                                      "; unseen by the old and the new model")},
        "reviewed_validation": {
            "scans": [x for x in held_scans if x not in reviewed_seen], "slices": len(reviewed),
            "patients": meta["exported"].get("held_out_patients", 0),
            "left_out_seen_by_base": reviewed_seen,
            "holdout_fraction": meta["exported"].get("holdout_fraction", cfg.holdout_fraction),
            "note": ("corrected scans of held-out patients (a fixed hash of the patient key), never trained on by this "
                     "run; the reviewers' own scans, unseen by the old and the new model"
                     + (f"; {len(reviewed_seen)} held-out scan(s) left out because {base.name}'s lineage trained on them"
                        if reviewed_seen else "")) if held_scans else
                    "no held-out corrected scans yet (about one corrected patient in five is held out, once at least "
                    "one other corrected patient remains to train on)",
        },
        "evaluation": {"old": old_eval, "new": new_eval, "old_headline": headline(old_eval), "new_headline": headline(new_eval)},
    }
    final = _publish(result.ref.path, card, version)
    wall = round(time.time() - t0, 1)
    out = {"version": final.name, "path": str(final), "base_version": base.name, "wall_s": wall,
           "old": headline(old_eval), "new": headline(new_eval), "slices": meta["exported"]["slices"],
           "real_seen_by_base": seen, "reviewed_slices": len(reviewed), "reviewed_scans": len(held_scans) - len(reviewed_seen)}
    _update_status(folder, state="done", fraction=1.0, message=f"wrote {TASK}/{final.name} in {wall:.0f} s", result=out,
                   finished_utc=_now())
    _discard_copies(folder)  # training copies of patient images: not kept
    return out


def _publish(staged: Path, card: dict[str, Any], version: str) -> Path:
    """Move the staged version folder (with the HITL card) into ``$COVIDTRACK_HOME/models/infection/``
    atomically; a version that appeared meanwhile is never replaced (the next number is used)."""
    from covidtrack import modelstore
    from covidtrack.segment.infection import write_card
    from covidtrack.segment.train_infection import model_card_markdown

    root = settings().models_dir / TASK
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        shutil.copy2(staged / "weights.pt", tmp / "weights.pt")
        final = root / version
        if final.exists() or any(r.version == version for r in modelstore.list_versions(TASK)):
            version = modelstore.next_version(TASK)
            final = root / version
        card = {**card, "version": version}
        write_card(tmp, card)
        (tmp / "MODEL_CARD.md").write_text(model_card_markdown(card) + hitl_card_markdown(card))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a version is meant to be shared like any other
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def hitl_card_markdown(card: dict[str, Any]) -> str:
    """The HITL section of MODEL_CARD.md: base version, corrections used, old vs new Dice."""
    h = card.get("hitl")
    if not h:
        return ""
    old, new = h["evaluation"]["old_headline"], h["evaluation"]["new_headline"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return "\n".join([
        "",
        "## Human-in-the-loop fine-tuning",
        f"- started from {h['base_version']}; {len(h['corrected_scans'])} corrected scans, {h['corrected_slices']} axial slices",
        f"- fixed validation set: {len(h['validation_set']['real'])} real slices + phantom slices (seeds {h['validation_set']['phantom_seeds']})",
        f"- {h['validation_set'].get('note', '')}",
        f"- reviewed hold-out: {(h.get('reviewed_validation') or {}).get('note', 'not recorded (run before hold-outs existed)')}",
        "",
        "| Dice (infection) | old | new |",
        "|---|---|---|",
        f"| real slices | {f(old['dice_real'])} | {f(new['dice_real'])} |",
        f"| phantom slices | {f(old['dice_phantom'])} | {f(new['dice_phantom'])} |",
        f"| reviewed hold-out slices | {f(old.get('dice_reviewed'))} | {f(new.get('dice_reviewed'))} |",
        f"| all | {f(old['dice_all'])} | {f(new['dice_all'])} |",
        "",
    ])


# --- versions, promotion, rollback ---------------------------------------------------------------
def register_version(store: "Store", ref: "ModelRef", active: bool = False) -> None:
    """Record a version in the store's ``models`` table with its validation headline."""
    card = ref.card()
    h = card.get("hitl", {}).get("evaluation", {})
    metrics = {"new": h.get("new_headline"), "old": h.get("old_headline"), "holdout": card.get("holdout_metrics")}
    store.upsert_model(ref.task, ref.version, card, metrics=metrics, active=active)


def sync_versions(store: "Store") -> list[str]:
    """Record every infection version on disk that the store does not know yet (e.g. written by a
    background job); returns the versions added."""
    from covidtrack import modelstore

    known = set(store.models(TASK)["version"]) if len(store.models(TASK)) else set()
    try:
        active_version = modelstore.active(TASK).version
    except ModelError:
        active_version = None
    added = []
    for ref in modelstore.list_versions(TASK):
        if ref.version not in known:
            register_version(store, ref, active=ref.version == active_version)
            added.append(ref.version)
    return added


def versions_frame() -> "pd.DataFrame":
    """One row per infection version on disk, with the store's active flag and validation Dice."""
    import pandas as pd

    from covidtrack import modelstore

    try:
        current = modelstore.active(TASK).version
    except ModelError:
        current = None
    rows = []
    for ref in modelstore.list_versions(TASK):
        card = ref.card()
        h = card.get("hitl", {})
        new = h.get("evaluation", {}).get("new_headline", {})
        holdout = (card.get("holdout_metrics") or {}).get("dice", {}) or {}
        cv = ((card.get("validation") or {}).get("summary") or {}).get("dice", {}) or {}
        if h:
            holdout, cv = {}, {}  # a fine-tuned version is compared on the HITL set (its own columns), not with a CV it never had
        rows.append({
            "version": ref.version,
            "active": ref.version == current,
            "origin": "shipped" if ref.shipped else "trained here",
            "created": card.get("created_utc", ""),
            "from": h.get("base_version", ""),
            "corrected scans": len(h.get("corrected_scans", [])) if h else None,
            "Dice reviewed (held-out scans)": new.get("dice_reviewed"),
            "Dice reviewed before": h.get("evaluation", {}).get("old_headline", {}).get("dice_reviewed") if h else None,
            "Dice real (HITL set)": new.get("dice_real"),
            "Dice phantom (HITL set)": new.get("dice_phantom"),
            "Dice before (same set)": h.get("evaluation", {}).get("old_headline", {}).get("dice_real") if h else None,
            "Dice held-out / CV": holdout.get("mean") if holdout.get("mean") is not None else cv.get("mean"),
        })
    frame = pd.DataFrame(rows)
    # numbers a version does not have (a shipped model has no HITL set) are blank, not "None"
    for col in ("corrected scans", "Dice reviewed (held-out scans)", "Dice reviewed before", "Dice real (HITL set)",
                "Dice phantom (HITL set)", "Dice before (same set)", "Dice held-out / CV"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


# Dashboard sessions are threads of one process, and only one process can hold the store: a
# promotion and a rollback at the same moment must not interleave their pointer and table writes
# (DuckDB's snapshots would otherwise let both rows end up flagged active).
_PROMOTE_LOCK = threading.Lock()


def promote(store: "Store", version: str) -> "ModelRef":
    """Make ``version`` the active infection model (explicit; new scans use it from now on)."""
    from covidtrack import modelstore

    with _PROMOTE_LOCK:  # the pointer and the store's models rows change together
        ref = modelstore.set_active(TASK, version)
        register_version(store, ref, active=True)
    return ref


def rollback(store: "Store") -> "ModelRef":
    """Re-activate the infection version that was active before the last promotion."""
    from covidtrack import modelstore

    with _PROMOTE_LOCK:
        ref = modelstore.rollback(TASK)
        register_version(store, ref, active=True)
    return ref


def resegment(
    store: "Store",
    scan_ids: Sequence[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Re-run the ACTIVE infection model on stored scans; returns the new segmentation ids.

    Lungs and lobes are reused from each scan's latest model segmentation (they do not depend on
    the infection model); the new segmentation's metric rows carry the new model tag, so earlier
    numbers stay in the store and traceable. Scans already segmented with the active infection
    version are skipped.
    """
    from covidtrack import metrics
    from covidtrack.segment.infection import InfectionModel
    from covidtrack.segment.types import Segmentation
    from covidtrack.store import FileStage, SegRecord, new_seg_id, read_canonical, write_canonical

    model = InfectionModel.load()
    segs = store.segmentations()
    done = {
        r.scan_id for r in segs.itertuples()
        if r.kind == "model" and _versions(r.model_versions).get(TASK) == model.version
    }
    todo = [s for s in (scan_ids if scan_ids is not None else list(store.scans()["scan_id"])) if s not in done]
    new_ids = []
    for i, scan_id in enumerate(todo):
        base = store.segmentation(scan_id, "model")
        volume = store.load_volume(scan_id)
        lungs = read_canonical(base.lungs_path)[0].astype(np.uint8)
        lobes = read_canonical(base.lobes_path)[0].astype(np.uint8) if base.lobes_path else None
        infection, _ = model.predict(volume.array, lungs, volume.spacing)
        infection = np.where(lungs > 0, infection, 0).astype(np.uint8)
        versions = {**base.model_versions, TASK: model.version}
        table = metrics.scan_metrics(volume, Segmentation(lungs=lungs, infection=infection, lobes=lobes, model_versions=versions))
        seg_id = new_seg_id()
        with FileStage() as stage:
            path = stage.put(store.mask_path_for(seg_id, "infection"), lambda p: write_canonical(p, volume, infection))
            store.add_segmentation(
                SegRecord(seg_id=seg_id, scan_id=scan_id, kind="model", model_versions=versions, lungs_path=base.lungs_path,
                          infection_path=path, lobes_path=base.lobes_path),
                table,
            )
        new_ids.append(seg_id)
        if progress is not None:
            progress(i + 1, len(todo), scan_id)
    return new_ids


def _versions(value: Any) -> dict[str, str]:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


# --- CLI (python -m covidtrack train infection --from-corrections) --------------------------------
def run_cli(args: argparse.Namespace) -> int:
    """Foreground fine-tuning from the store's corrections (this process owns the store)."""
    from covidtrack import modelstore
    from covidtrack.store import Store

    from covidtrack.errors import InputError

    steps = getattr(args, "finetune_iterations", None)
    if steps is not None and int(steps) < 1:
        raise InputError("--finetune-iterations", f"{steps} steps", "give at least 1 step (150 by default)")
    version = getattr(args, "version", None)
    if version:
        modelstore.check_new_version(TASK, version)
    cfg = RetrainConfig(
        iterations=int(steps) if steps is not None else RetrainConfig.iterations,
        seed=int(getattr(args, "seed", 0) or 0),
        version=version,
        notes=getattr(args, "notes", "") or "",
    )
    # the store is held only to export the corrections and to register the result: a run takes
    # minutes, and meanwhile the dashboard and other commands must be able to open the store
    with Store.open() as store:
        job = prepare_job(store, cfg)
    print(f"job {job.folder}: {job_status(job.folder)['message']}")
    try:
        result = run_job(job.folder, echo=True)
    except BaseException as err:
        _update_status(job.folder, state="failed", error=f"{type(err).__name__}: {err}")
        _discard_copies(job.folder)
        raise
    print(f"{TASK}/{result['version']} written to {result['path']} ({result['wall_s']:.0f} s)")
    try:
        with Store.open() as store:
            register_version(store, modelstore.get(TASK, result["version"]), active=False)
    except StoreError as err:  # e.g. the dashboard opened the store meanwhile: it lists the version itself
        print(f"note: the version is written but not yet in the store's models table ({err}); the dashboard's "
              "Models page records it, and `hitl promote` works as usual", file=sys.stderr)
    print(f"validation Dice old {result['old']} -> new {result['new']}")
    if not result.get("reviewed_slices"):
        print("no held-out corrected scans yet: the real-slice Dice measures retention, not the reviewers' own scans")
    print(f"not active yet: promote it on the Models page or with `python -m covidtrack hitl promote {result['version']}`")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the background process: ``python -m covidtrack.hitl.retrain JOB_FOLDER``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m covidtrack.hitl.retrain JOB_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_job(folder, echo=True)
        return 0
    except BaseException as err:  # noqa: BLE001 - the UI must learn why, whatever happened
        _update_status(folder, state="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        _discard_copies(folder)
        return 1


if __name__ == "__main__":
    sys.exit(main())

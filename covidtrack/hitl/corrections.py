"""Correcting the model's infection mask, slice by slice, and saving the result as a NEW record.

Edit operations are pure functions on one axial slice of labels (uint8, 0 none / 1 GGO /
2 consolidation): they return a new array and never modify their input, so the undo stack of
:class:`EditSession` only has to remember the slice before each edit. Points are pixel indices
``(y, x)`` on the canonical slice (``volume.array[z]``), radii are in pixels.

:func:`save_correction` writes the corrected infection mask next to the model's masks and records
it with :meth:`covidtrack.store.Store.add_correction`: a new ``corrected`` segmentation plus a
``corrections`` row with the effort (seconds, voxels changed, slices touched, reviewer). The model
output is never touched, and a second correction of the same scan is another new record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from covidtrack.errors import StoreError
from covidtrack.labels import CONSOLIDATION, GGO

if TYPE_CHECKING:
    from covidtrack.store import Store

Point = tuple[int, int]  # (y, x) pixel indices on a canonical axial slice

#: 8-connectivity in 2D: lesions touching at a corner are one lesion for a click.
_CONN8 = np.ones((3, 3), dtype=bool)
#: Default HU window of region growing: aerated-lung voxels below -750 HU are not infection;
#: above +100 HU are vessels walls / bone (Hounsfield ranges used in COVID-19 CT quantification).
DEFAULT_GROW_HU: tuple[float, float] = (-750.0, 100.0)
#: An idle gap longer than this (seconds) between two edits counts as this much work only: the
#: reviewer took a break, the effort should not include it.
IDLE_CAP_S = 60.0


def _check_slice(labels: np.ndarray) -> None:
    if labels.ndim != 2:
        raise ValueError(f"edit operations take one 2D slice, got shape {labels.shape}")


def _inside(shape: tuple[int, ...], point: Point) -> bool:
    return 0 <= point[0] < shape[0] and 0 <= point[1] < shape[1]


def disk(shape: tuple[int, int], center: Point, radius: float) -> np.ndarray:
    """Boolean disk of ``radius`` pixels around ``center`` (y, x) on a grid of ``shape``."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= float(radius) ** 2


def stroke(shape: tuple[int, int], start: Point, end: Point, radius: float) -> np.ndarray:
    """Boolean footprint of a brush dragged from ``start`` to ``end`` (disks every half radius)."""
    n = max(1, int(np.ceil(np.hypot(end[0] - start[0], end[1] - start[1]) / max(radius / 2.0, 0.5))))
    out = np.zeros(shape, dtype=bool)
    for t in np.linspace(0.0, 1.0, n + 1):
        c = (round(start[0] + t * (end[0] - start[0])), round(start[1] + t * (end[1] - start[1])))
        out |= disk(shape, c, radius)
    return out


def brush(
    labels: np.ndarray,
    center: Point,
    radius: float,
    label: int,
    allowed: np.ndarray | None = None,
    end: Point | None = None,
) -> np.ndarray:
    """Paint ``label`` (1 GGO, 2 consolidation; 0 = erase) in a disk of ``radius`` px.

    With ``end`` the brush is dragged from ``center`` to ``end``. ``allowed`` (bool, same shape)
    limits painting to e.g. the lungs; erasing is never limited (removing a wrong label outside
    the lungs must always be possible).
    """
    _check_slice(labels)
    if label not in (0, GGO, CONSOLIDATION):
        raise ValueError(f"brush label must be 0 (erase), {GGO} (GGO) or {CONSOLIDATION} (consolidation), got {label}")
    footprint = stroke(labels.shape, center, end, radius) if end is not None else disk(labels.shape, center, radius)
    if label and allowed is not None:
        footprint &= allowed.astype(bool)
    out = labels.copy()
    out[footprint] = label
    return out


def component_at(labels: np.ndarray, point: Point) -> np.ndarray:
    """Boolean mask of the lesion (8-connected infected pixels, either type) under ``point``;
    all False when the click is on background or outside the slice."""
    _check_slice(labels)
    if not _inside(labels.shape, point) or labels[point] == 0:
        return np.zeros(labels.shape, dtype=bool)
    comps, _ = ndimage.label(labels > 0, structure=_CONN8)
    return comps == comps[point]


def delete_component(labels: np.ndarray, point: Point) -> np.ndarray:
    """Remove the whole lesion under ``point`` (one click); unchanged when nothing is there."""
    out = labels.copy()
    out[component_at(labels, point)] = 0
    return out


def accept_component(labels: np.ndarray, proposal: np.ndarray, point: Point) -> np.ndarray:
    """Take the lesion under ``point`` from ``proposal`` into ``labels`` (one click).

    ``proposal`` is a candidate label slice on the same grid, e.g. the model's original output
    (to restore a lesion deleted by mistake) or the model's labels at a lower probability
    threshold (to accept a lesion the model was unsure about). Labels already present elsewhere
    are kept; inside the accepted lesion the proposal's types win.
    """
    _check_slice(labels)
    if proposal.shape != labels.shape:
        raise ValueError(f"proposal {proposal.shape} and labels {labels.shape} differ in shape")
    comp = component_at(proposal, point)
    out = labels.copy()
    out[comp] = proposal[comp]
    return out


def region_grow(
    labels: np.ndarray,
    ct_hu: np.ndarray,
    point: Point,
    label: int = GGO,
    hu_range: tuple[float, float] = DEFAULT_GROW_HU,
    allowed: np.ndarray | None = None,
    max_radius: float | None = None,
) -> np.ndarray:
    """Flood-fill from ``point``: the 4-connected pixels whose HU lie in ``hu_range`` (inclusive),
    inside ``allowed`` (the lungs), within ``max_radius`` px of the click, get ``label``.

    Unchanged when the clicked pixel itself is outside the range or outside ``allowed``.
    """
    _check_slice(labels)
    if ct_hu.shape != labels.shape:
        raise ValueError(f"CT slice {ct_hu.shape} and labels {labels.shape} differ in shape")
    if label not in (GGO, CONSOLIDATION):
        raise ValueError(f"region growing paints {GGO} (GGO) or {CONSOLIDATION} (consolidation), got {label}")
    lo, hi = sorted(hu_range)
    candidate = (ct_hu >= lo) & (ct_hu <= hi)
    if allowed is not None:
        candidate &= allowed.astype(bool)
    if max_radius is not None:
        candidate &= disk(labels.shape, point, max_radius)
    out = labels.copy()
    if not _inside(labels.shape, point) or not candidate[point]:
        return out
    comps, _ = ndimage.label(candidate)  # 4-connectivity: a grow must not leak through corners
    out[comps == comps[point]] = label
    return out


def relabel(labels: np.ndarray, point: Point, new_label: int | None = None) -> np.ndarray:
    """Change the type of the lesion under ``point``: GGO <-> consolidation (``new_label=None``
    swaps each pixel's type) or everything to ``new_label`` (1 or 2)."""
    if new_label is not None and new_label not in (GGO, CONSOLIDATION):
        raise ValueError(f"relabel to {GGO} (GGO) or {CONSOLIDATION} (consolidation), got {new_label}")
    comp = component_at(labels, point)
    out = labels.copy()
    if new_label is None:
        out[comp & (labels == GGO)] = CONSOLIDATION
        out[comp & (labels == CONSOLIDATION)] = GGO
    else:
        out[comp] = new_label
    return out


# --- an editing session: undo stack and effort -------------------------------------------------
@dataclass(frozen=True)
class Effort:
    """What a correction cost the reviewer.

    ``seconds``: active editing time (idle gaps capped at :data:`IDLE_CAP_S`); ``voxels_changed``:
    voxels whose label differs from the model output (type changes count); ``slices_touched``:
    axial slices with at least one changed voxel; ``edits``: operations applied (undos excluded);
    ``undos``: operations taken back.
    """

    seconds: float
    voxels_changed: int
    slices_touched: int
    edits: int
    undos: int


@dataclass(frozen=True)
class _Step:
    z: int
    before: np.ndarray
    op: str


class EditSession:
    """A reviewer's corrections of one scan's infection mask, with undo.

    ``original`` (z, y, x) uint8 is the model output and is never modified; :attr:`working` is
    the corrected mask. ``clock`` returns seconds (injectable for tests).
    """

    def __init__(self, original: np.ndarray, clock: Callable[[], float] = time.monotonic, idle_cap_s: float = IDLE_CAP_S) -> None:
        if original.ndim != 3:
            raise ValueError(f"an edit session holds a 3D mask (z, y, x), got shape {original.shape}")
        self.original = np.array(original, dtype=np.uint8, copy=True)
        self.original.setflags(write=False)
        self.working = self.original.copy()
        self._undo: list[_Step] = []
        self._clock = clock
        self._idle_cap = float(idle_cap_s)
        self._last = clock()
        self._seconds = 0.0
        self._edits = 0
        self._undos = 0

    def _tick(self) -> None:
        now = self._clock()
        self._seconds += min(max(0.0, now - self._last), self._idle_cap)
        self._last = now

    def apply(self, z: int, new_slice: np.ndarray, op: str = "edit") -> int:
        """Replace slice ``z`` with ``new_slice`` (the result of an edit operation); returns the
        number of pixels that changed. A no-op edit is not put on the undo stack."""
        if new_slice.shape != self.working.shape[1:]:
            raise ValueError(f"slice shape {new_slice.shape} differs from {self.working.shape[1:]}")
        self._tick()
        before = self.working[z]
        changed = int(np.count_nonzero(before != new_slice))
        if changed:
            self._undo.append(_Step(int(z), before.copy(), op))
            self.working[z] = new_slice
            self._edits += 1
        return changed

    def edit(self, z: int, op: Callable[..., np.ndarray], *args: object, name: str | None = None, **kwargs: object) -> int:
        """Run ``op(working[z], *args, **kwargs)`` and :meth:`apply` it (convenience for the UI)."""
        return self.apply(z, op(self.working[z], *args, **kwargs), name or getattr(op, "__name__", "edit"))

    def undo(self) -> int | None:
        """Take back the last edit; returns its slice index, or ``None`` when nothing is left."""
        if not self._undo:
            return None
        self._tick()
        step = self._undo.pop()
        self.working[step.z] = step.before
        self._undos += 1
        return step.z

    @property
    def history(self) -> list[tuple[int, str]]:
        """(slice, operation) of the edits that can still be undone, oldest first."""
        return [(s.z, s.op) for s in self._undo]

    def changed(self) -> np.ndarray:
        """Boolean (z, y, x): voxels whose label differs from the model output."""
        return self.working != self.original

    def effort(self) -> Effort:
        diff = self.changed()
        return Effort(
            seconds=round(self._seconds, 1),
            voxels_changed=int(diff.sum()),
            slices_touched=int(diff.any(axis=(1, 2)).sum()),
            edits=self._edits,
            undos=self._undos,
        )


def effort_between(original: np.ndarray, corrected: np.ndarray, seconds: float = 0.0) -> Effort:
    """Effort of a correction made elsewhere (e.g. an imported NIfTI): voxel and slice counts
    from the difference, ``seconds`` as reported by the reviewer (0 when unknown)."""
    if original.shape != corrected.shape:
        raise ValueError(f"original {original.shape} and corrected {corrected.shape} differ in shape")
    diff = original != corrected
    return Effort(seconds=float(seconds), voxels_changed=int(diff.sum()), slices_touched=int(diff.any(axis=(1, 2)).sum()), edits=0, undos=0)


# --- saving ------------------------------------------------------------------------------------
def save_correction(
    store: "Store",
    scan_id: str,
    infection: np.ndarray,
    effort: Effort,
    author: str,
    original_seg_id: str | None = None,
) -> tuple[str, str]:
    """Store a corrected infection mask of ``scan_id`` as a NEW record; returns ``(correction_id, seg_id)``.

    Labels must be exactly 0, 1 or 2. Infection painted beyond the original lung mask (next to
    it) extends this correction's lungs and lobes (:func:`extend_lungs`), so the Segmentation
    contract (infection only inside the lungs) holds without dropping the lesion. The mask is
    written under a fresh file name, and its metrics are computed so the dashboard shows the
    corrected numbers (``model_version = "corrected"``).
    ``original_seg_id`` defaults to the scan's latest model segmentation. ``author`` is the
    reviewer's name or initials (required: every correction is attributable).
    """
    from covidtrack import metrics
    from covidtrack.segment.types import Segmentation
    from covidtrack.store import FileStage, new_seg_id, read_canonical, write_canonical

    if not author.strip():
        raise StoreError(f"correction of {scan_id}: reviewer name is empty. Fix: enter your name or initials")
    infection = _checked_labels(scan_id, np.asarray(infection))
    original = store.segmentation_by_id(original_seg_id) if original_seg_id else store.segmentation(scan_id, "model")
    if original.scan_id != scan_id:
        raise StoreError(f"correction of {scan_id}: segmentation {original.seg_id} belongs to scan {original.scan_id}. "
                         "Fix: pass a segmentation of the corrected scan (or none: its latest model segmentation)")
    volume = store.load_volume(scan_id)
    if infection.shape != volume.shape:
        raise StoreError(f"correction of {scan_id}: mask shape {infection.shape} differs from the scan {volume.shape}. "
                         "Fix: correct the mask on the scan's canonical grid")
    lungs = read_canonical(original.lungs_path)[0].astype(np.uint8)
    lobes = read_canonical(original.lobes_path)[0].astype(np.uint8) if original.lobes_path else None
    outside = (infection > 0) & (lungs == 0)
    grown = bool(outside.any())
    if grown:
        # a lesion painted beyond the lung mask says the mask missed diseased lung (a subpleural
        # consolidation, the usual reason to paint there): it joins this correction's lungs and lobes
        lungs, lobes = extend_lungs(lungs, lobes, outside, scan_id)
    seg = Segmentation(lungs=lungs, infection=infection, lobes=lobes, model_versions=original.model_versions)
    table = metrics.scan_metrics(volume, seg)
    with FileStage() as stage:
        # fresh "seg-" names: never an existing file, and cleaned as orphans if the insert fails
        name = new_seg_id()
        path = stage.put(store.mask_path_for(name, "corrected"), lambda p: write_canonical(p, volume, infection))
        lungs_path = lobes_path = None
        if grown:
            lungs_path = stage.put(store.mask_path_for(name, "corrected_lungs"), lambda p: write_canonical(p, volume, lungs))
            if lobes is not None:
                lobes_path = stage.put(store.mask_path_for(name, "corrected_lobes"), lambda p: write_canonical(p, volume, lobes))
        return store.add_correction(
            scan_id, author.strip(), effort.seconds, effort.voxels_changed, effort.slices_touched, path,
            original_seg_id=original.seg_id, metrics=table, lungs_path=lungs_path, lobes_path=lobes_path,
        )


def _checked_labels(scan_id: str, infection: np.ndarray) -> np.ndarray:
    """``infection`` as uint8 if every value is exactly 0, 1 or 2 (checked before any conversion:
    a cast would wrap 257 to 1 or cut a probability of 0.9 to 0)."""
    if infection.dtype == bool:
        return infection.astype(np.uint8)
    if not (np.issubdtype(infection.dtype, np.integer) or np.issubdtype(infection.dtype, np.floating)):
        raise StoreError(f"correction of {scan_id}: mask of type {infection.dtype}. Fix: pass labels 0 none, 1 GGO, 2 consolidation")
    bad = ~np.isin(infection, (0, GGO, CONSOLIDATION))
    if bad.any():
        values = np.unique(infection[bad])[:5]
        raise StoreError(f"correction of {scan_id}: {int(bad.sum())} voxels hold values other than 0, 1, 2 "
                         f"(e.g. {', '.join(str(v) for v in values)}; {infection.dtype}). Fix: pass labels 0 none, 1 GGO, "
                         "2 consolidation (threshold a probability map first)")
    return infection.astype(np.uint8)


def extend_lungs(lungs: np.ndarray, lobes: np.ndarray | None, added: np.ndarray, scan_id: str = "",
                 margin: int = 8) -> tuple[np.ndarray, np.ndarray | None]:
    """Lungs (0/1/2) and lobes grown by ``added`` voxels (painted infection beyond the lung mask).

    Each connected piece joins the side it touches most (else the nearest within ``margin``
    voxels); each voxel joins the nearest lobe of that side. A piece far from both lungs is
    refused: infection is only reported inside the lungs.
    """
    from covidtrack.segment.completion import assign_sides

    grown = assign_sides(lungs, added, margin=margin)
    far = added & (grown == 0)
    if far.any():
        raise StoreError(f"correction of {scan_id}: {int(far.sum())} painted voxels lie more than {margin} voxels away "
                         "from the lungs. Fix: paint infection inside or next to the lungs only")
    if lobes is None:
        return grown, None
    out = lobes.copy()
    comp, _ = ndimage.label(added)
    for k, sl in enumerate(ndimage.find_objects(comp), start=1):
        if sl is None:
            continue
        box = tuple(slice(max(0, q.start - margin), min(n, q.stop + margin)) for q, n in zip(sl, lobes.shape))
        mine = comp[box] == k
        side = int(grown[box][mine][0])
        sub = lobes[box]
        same_side = (sub > 0) & (grown[box] == side)
        if not same_side.any():
            continue  # no lobe of that side nearby: left unassigned (its lobe metrics miss it)
        _, idx = ndimage.distance_transform_edt(~same_side, return_indices=True)
        out[box][mine] = sub[tuple(idx)][mine]
    return grown, out


def load_for_review(store: "Store", scan_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, str]:
    """(CT HU, lungs, lobes or None, model infection, original seg_id) of a stored scan, for editing.

    The model's output is the starting point even when earlier corrections exist: each
    correction is measured against what the model produced.
    """
    from covidtrack.store import read_canonical

    rec = store.segmentation(scan_id, "model")
    ct = store.load_volume(scan_id).array
    lungs = read_canonical(rec.lungs_path)[0].astype(np.uint8)
    lobes = read_canonical(rec.lobes_path)[0].astype(np.uint8) if rec.lobes_path else None
    infection = read_canonical(rec.infection_path)[0].astype(np.uint8)
    return ct, lungs, lobes, infection, rec.seg_id

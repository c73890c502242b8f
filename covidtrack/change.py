"""Change of infection between the baseline and a follow-up registered onto it (pure functions).

Both label maps live on the baseline's canonical grid (the follow-up's infection is warped with
:meth:`covidtrack.register.Registration.warp_labels`). The change map uses
:data:`covidtrack.labels.CHANGE_LABELS`: 0 no infection in either scan, 1 new (follow-up only),
2 resolved (baseline only), 3 persistent (both). GGO and consolidation both count as infection;
a GGO that consolidates is persistent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidtrack.labels import (
    CHANGE_LABELS,
    CHANGE_NEW,
    CHANGE_PERSISTENT,
    CHANGE_RESOLVED,
    LEFT_LOBES,
    LEFT_LUNG,
    LOBE_LABELS,
    RIGHT_LOBES,
    RIGHT_LUNG,
)

METRIC_UNIT = "mL"
NOT_IMAGED = 255  # label warped into baseline voxels the follow-up does not cover (see warped_followup)


def change_map(
    baseline_infection: np.ndarray,
    warped_followup_infection: np.ndarray,
    lungs: np.ndarray | None = None,
    imaged: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 change labels (1 new, 2 resolved, 3 persistent) on the baseline grid.

    ``lungs`` (baseline lung labels) optionally restricts the map to the baseline lungs, which
    drops warped follow-up infection that lands outside them (registration error at the pleura).
    ``imaged`` (bool, baseline grid) marks where the follow-up has data; elsewhere (a follow-up
    that stops short of the apex or the bases) nothing is known, so nothing is called new,
    resolved or persistent there (see ``not_imaged_*`` in :func:`change_metrics`).
    """
    if baseline_infection.shape != warped_followup_infection.shape:
        raise ValueError(
            f"baseline infection {baseline_infection.shape} and warped follow-up infection "
            f"{warped_followup_infection.shape} must share the baseline grid; warp the follow-up first"
        )
    before = baseline_infection > 0
    after = warped_followup_infection > 0
    out = np.zeros(before.shape, dtype=np.uint8)
    out[after & ~before] = CHANGE_NEW
    out[before & ~after] = CHANGE_RESOLVED
    out[before & after] = CHANGE_PERSISTENT
    if lungs is not None:
        if lungs.shape != out.shape:
            raise ValueError(f"lungs {lungs.shape} must share the baseline grid {out.shape}")
        out[lungs == 0] = 0
    if imaged is not None:
        if imaged.shape != out.shape:
            raise ValueError(f"imaged mask {imaged.shape} must share the baseline grid {out.shape}")
        out[~imaged] = 0
    return out


def warped_followup(warped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split labels warped with ``outside=NOT_IMAGED`` into (infection, imaged mask)."""
    imaged = warped != NOT_IMAGED
    return np.where(imaged, warped, 0).astype(np.uint8), imaged


def _region_masks(shape: tuple[int, ...], lobes: np.ndarray | None, lungs: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """Region name -> boolean mask (None = everything) for whole, right, left and the lobes."""
    regions: dict[str, np.ndarray | None] = {"whole": None}
    if lungs is not None:
        regions["right"] = lungs == RIGHT_LUNG
        regions["left"] = lungs == LEFT_LUNG
    elif lobes is not None:
        regions["right"] = np.isin(lobes, RIGHT_LOBES)
        regions["left"] = np.isin(lobes, LEFT_LOBES)
    if lobes is not None:
        for lab, name in LOBE_LABELS.items():
            regions[name] = lobes == lab
    for name, mask in regions.items():
        if mask is not None and mask.shape != shape:
            raise ValueError(f"{name} mask {mask.shape} must share the change map's grid {shape}")
    return regions


def change_metrics(
    change: np.ndarray,
    lobes: np.ndarray | None,
    spacing: tuple[float, float, float],
    lungs: np.ndarray | None = None,
    *,
    imaged: np.ndarray | None = None,
    baseline_infection: np.ndarray | None = None,
) -> pd.DataFrame:
    """Long rows (region, metric, value, unit) of infection change in mL.

    Regions: ``whole``, ``right`` / ``left`` (from ``lungs`` if given, else from ``lobes``) and
    the five lobes when ``lobes`` is given (baseline lobes: change is measured in baseline
    anatomy). Metrics per region: ``new_ml``, ``resolved_ml``, ``persistent_ml``,
    ``baseline_infection_ml`` (resolved + persistent), ``followup_infection_ml`` (new +
    persistent) and ``net_change_ml`` (new - resolved). ``spacing`` is (z, y, x) mm.

    With ``imaged`` (where the follow-up has data) and ``lungs``, also ``not_imaged_lung_ml``
    (baseline lung the follow-up did not cover) and, with ``baseline_infection``,
    ``not_imaged_infection_ml`` (baseline infection there: neither resolved nor persistent,
    unknown). The other metrics then cover the imaged part only.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0  # mm^3 -> mL
    # One bincount per region: counts of labels 0..3.
    rows: list[tuple[str, str, float, str]] = []
    unseen = unseen_inf = None
    if imaged is not None and lungs is not None:
        unseen = ~imaged & (lungs > 0)  # baseline lung the follow-up did not cover
        unseen_inf = unseen & (baseline_infection > 0) if baseline_infection is not None else None
    for region, mask in _region_masks(change.shape, lobes, lungs).items():
        values = change if mask is None else change[mask]
        counts = np.bincount(values.ravel(), minlength=len(CHANGE_LABELS) + 1).astype(np.float64) * voxel_ml
        new, resolved, persistent = counts[CHANGE_NEW], counts[CHANGE_RESOLVED], counts[CHANGE_PERSISTENT]
        for metric, value in (
            ("new_ml", new),
            ("resolved_ml", resolved),
            ("persistent_ml", persistent),
            ("baseline_infection_ml", resolved + persistent),
            ("followup_infection_ml", new + persistent),
            ("net_change_ml", new - resolved),
        ):
            rows.append((region, metric, float(value), METRIC_UNIT))
        if unseen is not None:
            n = np.count_nonzero(unseen if mask is None else unseen[mask])
            rows.append((region, "not_imaged_lung_ml", float(n) * voxel_ml, METRIC_UNIT))
            if unseen_inf is not None:
                n = np.count_nonzero(unseen_inf if mask is None else unseen_inf[mask])
                rows.append((region, "not_imaged_infection_ml", float(n) * voxel_ml, METRIC_UNIT))
    return pd.DataFrame(rows, columns=["region", "metric", "value", "unit"])


#: a persistent lesion whose volume changed by more than this share and by at least
#: :data:`LESION_CHANGE_MIN_ML` is "larger" / "smaller"; otherwise "stable"
LESION_CHANGE_SHARE = 0.25
LESION_CHANGE_MIN_ML = 0.5
LESION_COLUMNS = ("lesion", "status", "lobe", "baseline_ml", "followup_ml", "change_ml", "baseline_pieces",
                  "followup_pieces", "slice")


def lesion_tracks(
    change: np.ndarray, lobes: np.ndarray | None, spacing: tuple[float, float, float], min_ml: float | None = None,
    not_imaged: np.ndarray | None = None,
) -> pd.DataFrame:
    """Lesions matched between the baseline and a registered follow-up, from a change map.

    Baseline lesions are the 3D components (26-connectivity, at least ``min_ml``, default
    :data:`covidtrack.metrics.MIN_LESION_ML`, as the lesion count) of baseline infection
    (resolved + persistent), follow-up lesions those of the warped follow-up infection (new +
    persistent), both inside the imaged baseline lung. Lesions that overlap are one track (a
    lesion that split or merged stays one track, its pieces counted). Per track: ``status`` new
    (no baseline lesion), resolved (no follow-up lesion), or for a persistent one larger / smaller
    / stable (volume change of more than :data:`LESION_CHANGE_SHARE` and at least
    :data:`LESION_CHANGE_MIN_ML`); "partly not imaged" when part of its baseline lesion lies where
    the follow-up has no data (``not_imaged``: baseline infection there, on the same grid; its
    baseline volume then includes that part, and nothing is said about how it changed);
    ``lobe`` where most of it lies (baseline lobes); volumes in mL on the baseline grid;
    ``slice``: the baseline axial slice through its centre (where the aligned viewer shows it).
    Sorted by lobe, then size.
    """
    from scipy import ndimage

    from covidtrack.metrics import MIN_LESION_ML

    min_ml = MIN_LESION_ML if min_ml is None else min_ml
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if not change.any():
        return pd.DataFrame(columns=list(LESION_COLUMNS))
    unknown_all = not_imaged if not_imaged is not None and not_imaged.shape == change.shape else np.zeros(change.shape, bool)
    box = ndimage.find_objects(((change > 0) | unknown_all).astype(np.uint8))[0]  # the box around all infection
    z0 = box[0].start
    change = change[box]
    unknown = unknown_all[box] & (change == 0)
    lobes = lobes[box] if lobes is not None else None
    structure = np.ones((3, 3, 3), dtype=bool)
    before = (change == CHANGE_RESOLVED) | (change == CHANGE_PERSISTENT) | unknown
    after = (change == CHANGE_NEW) | (change == CHANGE_PERSISTENT)
    lab_b, n_b = ndimage.label(before, structure=structure)
    lab_a, n_a = ndimage.label(after, structure=structure)
    size_b = np.bincount(lab_b.ravel(), minlength=n_b + 1) * voxel_ml
    size_a = np.bincount(lab_a.ravel(), minlength=n_a + 1) * voxel_ml
    keep_b = {i for i in range(1, n_b + 1) if size_b[i] >= min_ml}
    keep_a = {i for i in range(1, n_a + 1) if size_a[i] >= min_ml}
    # union-find over baseline (b) and follow-up (a) lesions that share persistent voxels
    parent: dict[tuple[str, int], tuple[str, int]] = {("b", i): ("b", i) for i in keep_b} | {("a", i): ("a", i) for i in keep_a}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    both = before & after
    pairs = np.unique(np.stack([lab_b[both], lab_a[both]], axis=1), axis=0) if both.any() else np.zeros((0, 2), int)
    for i, j in pairs:
        if int(i) in keep_b and int(j) in keep_a:
            parent[find(("b", int(i)))] = find(("a", int(j)))
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    # per lesion, in one pass over each map: voxels per lobe and the sum of axial slice indices
    n_lobes = max(LOBE_LABELS) + 1
    z = np.broadcast_to(np.arange(change.shape[0])[:, None, None], change.shape)

    def stats(lab: np.ndarray, n: int, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = lab[inside].astype(np.int64)
        count = np.bincount(ids, minlength=n + 1).astype(np.float64)
        zsum = np.bincount(ids, weights=z[inside], minlength=n + 1)
        if lobes is None:
            return count, zsum, np.zeros((n + 1, n_lobes))
        per_lobe = np.bincount(ids * n_lobes + lobes[inside].astype(np.int64), minlength=(n + 1) * n_lobes)
        return count, zsum, per_lobe.reshape(n + 1, n_lobes).astype(np.float64)

    cnt_b, z_b, lobe_b = stats(lab_b, n_b, before)
    cnt_a, z_a, lobe_a = stats(lab_a, n_a, after)
    unseen_b = np.bincount(lab_b[unknown].astype(np.int64), minlength=n_b + 1)
    rows = []
    for members in groups.values():
        bs = [i for s, i in members if s == "b"]
        as_ = [i for s, i in members if s == "a"]
        b_ml, a_ml = float(sum(size_b[i] for i in bs)), float(sum(size_a[i] for i in as_))
        if not bs:
            status = "new"
        elif unseen_b[bs].sum() > 0:
            status = "partly not imaged"  # the follow-up did not see all of it: neither gone nor measured
        elif not as_:
            status = "resolved"
        elif abs(a_ml - b_ml) > LESION_CHANGE_SHARE * b_ml and abs(a_ml - b_ml) >= LESION_CHANGE_MIN_ML:
            status = "larger" if a_ml > b_ml else "smaller"
        else:
            status = "stable"
        # (persistent voxels belong to a baseline and a follow-up lesion: counted in both, equally)
        voxels = cnt_b[bs].sum() + cnt_a[as_].sum()
        per_lobe = (lobe_b[bs].sum(axis=0) + lobe_a[as_].sum(axis=0))[1:]
        lobe = LOBE_LABELS.get(int(np.argmax(per_lobe)) + 1) if lobes is not None and per_lobe.sum() else None
        rows.append({"status": status, "lobe": lobe, "baseline_ml": round(b_ml, 2), "followup_ml": round(a_ml, 2),
                     "change_ml": round(a_ml - b_ml, 2), "baseline_pieces": len(bs), "followup_pieces": len(as_),
                     "slice": z0 + int(round(float((z_b[bs].sum() + z_a[as_].sum()) / voxels)))})
    lobe_order = {name: k for k, name in LOBE_LABELS.items()}
    rows.sort(key=lambda r: (lobe_order.get(r["lobe"], 99), -max(r["baseline_ml"], r["followup_ml"])))
    for k, r in enumerate(rows, start=1):
        r["lesion"] = k
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


LESION_STATUSES = ("new", "resolved", "larger", "smaller", "stable", "partly not imaged")
#: tracks at least this large (mL, at either date) are counted apart: the smallest new lesions
#: are often specks of the infection model's noise at one date
LESION_NOTABLE_ML = 1.0


def lesion_counts(tracks: pd.DataFrame, min_ml: float = 0.0) -> dict[str, int]:
    """How many tracks of each status (:data:`LESION_STATUSES`), counting only
    tracks of at least ``min_ml`` mL at the baseline or the follow-up."""
    big = tracks[tracks[["baseline_ml", "followup_ml"]].max(axis=1) >= min_ml] if min_ml > 0 else tracks
    return {s: int((big["status"] == s).sum()) for s in LESION_STATUSES}


def lesion_count_rows(tracks: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """One row per analysed follow-up ``(date, scan_id)`` (also one without any lesion): its date
    and :func:`lesion_count_text` per status. ``tracks`` carries a ``scan_id`` column."""
    return pd.DataFrame([{"follow-up": date, **lesion_count_text(tracks[tracks["scan_id"] == scan])} for date, scan in pairs])


def lesion_count_text(tracks: pd.DataFrame) -> dict[str, str]:
    """Per status "n", or "n (m >= 1 mL)" when some are smaller than :data:`LESION_NOTABLE_ML`."""
    every, notable = lesion_counts(tracks), lesion_counts(tracks, LESION_NOTABLE_ML)
    return {s: str(every[s]) if every[s] == notable[s] else f"{every[s]} ({notable[s]} ≥ {LESION_NOTABLE_ML:g} mL)"
            for s in LESION_STATUSES}

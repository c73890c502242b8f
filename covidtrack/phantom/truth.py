"""Ground truth of one synthetic scan, and small volume helpers.

Label numbering follows :mod:`covidtrack.labels`. Metrics proper (percent of involvement,
severity scores) belong to :mod:`covidtrack.metrics`; here only voxel counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidtrack.labels import LOBE_LABELS, LOBE_SIDE

# Tissue classes of the phantom (Truth.tissue), for HU checks and body masks.
TISSUE_LABELS: dict[int, str] = {
    0: "outside",  # air around the patient (and the table)
    1: "fat",
    2: "soft",  # muscle, heart, vessels outside the lungs, abdominal organs
    3: "bone",
    4: "lung",  # lung parenchyma (including fissures and infection)
    5: "vessel",  # pulmonary vessels inside the lungs
    6: "airway",  # air inside the body: trachea, bronchi, gas in the stomach
    7: "table",
}
TISSUE_IDS: dict[str, int] = {name: lab for lab, name in TISSUE_LABELS.items()}

# lobe -> lung side, as a lookup array (index = lobe label)
_LOBE_TO_LUNG = np.zeros(8, dtype=np.uint8)
for _lobe, _side in LOBE_SIDE.items():
    _LOBE_TO_LUNG[_lobe] = _side


def lungs_from_lobes(lobes: np.ndarray) -> np.ndarray:
    """Lung label map (1 right, 2 left) implied by a lobe map (1-3 right, 4-5 left)."""
    return _LOBE_TO_LUNG[lobes]


def volume_ml(label_map: np.ndarray, label: int | tuple[int, ...], spacing: tuple[float, float, float]) -> float:
    """Volume in mL of the voxels of ``label_map`` equal to ``label`` (or any of several).

    ``spacing`` is the voxel size in mm (any axis order); 1 mL = 1000 mm^3.
    """
    labels = (label,) if isinstance(label, int) else tuple(label)
    count = int(np.isin(label_map, labels).sum()) if len(labels) > 1 else int((label_map == labels[0]).sum())
    return count * float(np.prod(spacing)) / 1000.0


@dataclass(frozen=True, eq=False)
class Truth:
    """Exact labels of one phantom scan, on the scan's own grid (same shape as the Volume).

    - ``lungs``: uint8, 1 right lung, 2 left lung (includes vessels, fissures, infection and
      consolidation touching the pleura);
    - ``lobes``: uint8, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL; every lung voxel has exactly one lobe;
    - ``infection``: uint8, 1 GGO, 2 consolidation, only inside the lungs, exactly where the
      disease changed the HU before blur and noise (vessels crossing GGO stay visible and are
      labelled GGO, as radiologists draw it);
    - ``tissue``: uint8, see :data:`TISSUE_LABELS`;
    - ``day``: days since the baseline scan of the series (0 for the baseline);
    - ``displacement``: float32 ``(z, y, x, 3)`` in mm, components in (z, y, x) order, on the
      BASELINE grid, or ``None`` for the baseline. For a baseline voxel centre ``q`` the same
      tissue lies at ``q + u(q)`` in this scan, so ``value(q) = this_scan(q + u(q))`` (see
      :func:`covidtrack.phantom.warp_to_baseline`) brings this scan into baseline space, like an
      ANTs transform with fixed = baseline, moving = this scan;
    - ``spacing``: (z, y, x) mm, for the volume helpers;
    - ``rotation_deg`` / ``translation_mm`` / ``inspiration_mm``: the pose and breathing change
      from the baseline that produced ``displacement`` (zeros for the baseline).
    """

    lungs: np.ndarray
    lobes: np.ndarray
    infection: np.ndarray
    tissue: np.ndarray
    day: float
    displacement: np.ndarray | None
    spacing: tuple[float, float, float]
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    inspiration_mm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lungs", "lobes", "infection", "tissue"):
            arr = getattr(self, name)
            if arr.dtype != np.uint8 or arr.shape != self.lungs.shape:
                raise ValueError(f"Truth.{name} must be uint8 of shape {self.lungs.shape}")
            arr.setflags(write=False)
        if self.displacement is not None:
            if self.displacement.shape != (*self.lungs.shape, 3) or self.displacement.dtype != np.float32:
                raise ValueError("Truth.displacement must be float32 of shape (z, y, x, 3)")
            self.displacement.setflags(write=False)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0

    def lung_ml(self, side: int | None = None) -> float:
        """Lung volume in mL: both lungs, or one side (1 right, 2 left)."""
        if side is None:
            return int(np.count_nonzero(self.lungs)) * self.voxel_ml
        return volume_ml(self.lungs, side, self.spacing)

    def lobe_ml(self) -> dict[str, float]:
        """Volume in mL of each lobe, keyed by lobe name (RUL ... LLL)."""
        counts = np.bincount(self.lobes.ravel(), minlength=6)
        return {name: int(counts[lab]) * self.voxel_ml for lab, name in LOBE_LABELS.items()}

    def infection_ml(self, label: int | None = None, lobe: int | None = None) -> float:
        """Infected volume in mL: all infection, or one class (1 GGO, 2 consolidation), in one lobe."""
        mask = self.infection > 0 if label is None else self.infection == label
        if lobe is not None:
            mask &= self.lobes == lobe
        return int(np.count_nonzero(mask)) * self.voxel_ml

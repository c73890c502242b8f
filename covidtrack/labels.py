"""Class maps as plain data, and lookup tables to other tools' numbering.

Used everywhere; nothing here imports torch or SimpleITK.
"""

from __future__ import annotations

import numpy as np

# Lungs (Segmentation.lungs)
LUNG_LABELS: dict[int, str] = {1: "right", 2: "left"}
RIGHT_LUNG, LEFT_LUNG = 1, 2

# Lobes (Segmentation.lobes): right lung = 1-3, left lung = 4-5
LOBE_LABELS: dict[int, str] = {1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}
LOBE_IDS: dict[str, int] = {name: lab for lab, name in LOBE_LABELS.items()}
RIGHT_LOBES = (1, 2, 3)
LEFT_LOBES = (4, 5)
LOBE_SIDE: dict[int, int] = {1: RIGHT_LUNG, 2: RIGHT_LUNG, 3: RIGHT_LUNG, 4: LEFT_LUNG, 5: LEFT_LUNG}
LOBE_FULL_NAMES: dict[str, str] = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}

# Infection (Segmentation.infection)
INFECTION_LABELS: dict[int, str] = {1: "GGO", 2: "consolidation"}
GGO, CONSOLIDATION = 1, 2

# Change of infection between the baseline and a registered follow-up (covidtrack.change),
# on the baseline grid: new = infected only in the follow-up, resolved = only in the baseline,
# persistent = in both.
CHANGE_LABELS: dict[int, str] = {1: "new", 2: "resolved", 3: "persistent"}
CHANGE_NEW, CHANGE_RESOLVED, CHANGE_PERSISTENT = 1, 2, 3

# Metric regions, in display order
REGIONS: tuple[str, ...] = ("whole", "right", "left", "RUL", "RML", "RLL", "LUL", "LLL")

# Other tools' lobe numbering -> ours. Import: ours = table[theirs]; export: inverse.
LUNGMASK_LOBES: dict[int, int] = {1: 4, 2: 5, 3: 1, 4: 2, 5: 3}  # 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL
TOTALSEGMENTATOR_LOBES: dict[int, int] = {10: 4, 11: 5, 12: 1, 13: 2, 14: 3}
CIP_LOBES: dict[int, int] = {4: 1, 5: 2, 6: 3, 7: 4, 8: 5}
LOBE_TABLES: dict[str, dict[int, int]] = {
    "covidtrack": {k: k for k in LOBE_LABELS},
    "lungmask": LUNGMASK_LOBES,
    "totalsegmentator": TOTALSEGMENTATOR_LOBES,
    "cip": CIP_LOBES,
}


def lookup_array(table: dict[int, int], size: int | None = None) -> np.ndarray:
    """A dense uint8 lookup array: ``lut[theirs] == ours``, 0 for values not in the table."""
    n = (max(table) + 1) if size is None else size
    lut = np.zeros(max(n, 1), dtype=np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    return lut


def import_lobes(labels: np.ndarray, tool: str) -> np.ndarray:
    """Map another tool's lobe label map to covidtrack numbering (unknown values -> 0)."""
    table = LOBE_TABLES[tool]
    lut = lookup_array(table, size=max(int(labels.max(initial=0)) + 1, max(table) + 1))
    return lut[labels.astype(np.int64)]


def export_lobes(lobes: np.ndarray, tool: str) -> np.ndarray:
    """Map covidtrack lobes to another tool's numbering."""
    inverse = {ours: theirs for theirs, ours in LOBE_TABLES[tool].items()}
    lut = np.zeros(6, dtype=np.uint16)
    for ours, theirs in inverse.items():
        lut[ours] = theirs
    return lut[lobes.astype(np.int64)]

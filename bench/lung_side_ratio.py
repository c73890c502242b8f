"""Smaller / larger lung volume on real lung masks: the normal range behind ``flag_lung_asymmetry``
(``covidtrack.metrics.MIN_SIDE_RATIO``).

Data: the 20 DIR-Lab COPD lung masks in ../shared/data/masks/dirlab_copd_lung_masks (10 patients,
inspiration and expiration; binary masks split into right and left by
``covidtrack.segment.lobes.split_lungs`` on a 2x subsampled grid). No model is involved.

    python bench/lung_side_ratio.py   # -> bench/results/lung_side_ratio.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.metrics import MIN_SIDE_RATIO  # noqa: E402
from covidtrack.segment.lobes import split_lungs  # noqa: E402

MASKS = REPO.parent / "shared" / "data" / "masks" / "dirlab_copd_lung_masks"


def main() -> int:
    import SimpleITK as sitk

    t0 = time.time()
    rows = {}
    for path in sorted(MASKS.glob("*.nii*")):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[::2, ::2, ::2]
        lab = split_lungs(arr > 0) if set(np.unique(arr).tolist()) <= {0, 1} else arr
        right, left = int((lab == 1).sum()), int((lab == 2).sum())
        rows[path.name.split(".")[0]] = round(min(right, left) / max(right, left), 3)
    ratios = np.array(list(rows.values()))
    out = {
        "what": "smaller / larger lung volume per mask (right vs left), the normal range behind flag_lung_asymmetry",
        "data": "DIR-Lab COPD lung masks (../shared/data/masks/dirlab_copd_lung_masks, see PROVENANCE.md), 2x subsampled",
        "model_version": "none (reference masks)",
        "threshold_in_code": MIN_SIDE_RATIO,
        "per_mask": rows,
        "summary": {"n": int(ratios.size), "min": float(ratios.min()), "median": float(np.median(ratios)), "max": float(ratios.max()),
                    "below_threshold": int((ratios < MIN_SIDE_RATIO).sum())},
        "hardware": {"processor": platform.machine(), "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
    }
    (REPO / "bench" / "results" / "lung_side_ratio.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

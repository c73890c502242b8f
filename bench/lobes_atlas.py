"""Experiment (not in the product): multi-atlas lobes from lung masks, against the shipped shape prior.

For each LIDC case, the other two cases' lung masks are registered onto its lung mask (ANTsPy SyN
on Gaussian-smoothed masks, right and left lung separately), their reference lobe partitions
(their own hand-drawn fissures, extended by the surface model; see
``covidtrack.segment.eval_fissures.reference_partition``) are warped along as smoothed one-hot maps
and fused by the mean. Scored like the prior's leave-one-out: mean distance (mm) from the case's
hand-drawn fissure voxels to the predicted border of the lobes they separate.

    nice -n 5 python bench/lobes_atlas.py    # ~4 min on 2 cores; writes bench/results/lobes_atlas.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.segment import eval_fissures as ef  # noqa: E402
from covidtrack.segment import train_lobes as tl  # noqa: E402
from covidtrack.segment.lobes import enforce_connectivity  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "masks" / "lidc_lung_fissure_masks"
SIDES = {1: (1, 2, 3), 2: (4, 5)}


def _image(arr: np.ndarray, spacing):
    import ants

    return ants.from_numpy(arr.astype("float32"), spacing=tuple(float(s) for s in spacing))


def warp_lobe_probs(target: tl.CaseData, atlas: tl.CaseData, atlas_lobes: np.ndarray, side: int) -> np.ndarray:
    """The atlas' lobes of one side, as smoothed one-hot maps, on the target grid."""
    import ants

    fixed = _image(ndi.gaussian_filter((target.lungs == side).astype(np.float32), 1.0), target.spacing)
    moving = _image(ndi.gaussian_filter((atlas.lungs == side).astype(np.float32), 1.0), atlas.spacing)
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN", verbose=False)
    out = []
    for lab in SIDES[side]:
        p = _image(ndi.gaussian_filter((atlas_lobes == lab).astype(np.float32), 0.7), atlas.spacing)
        out.append(ants.apply_transforms(fixed=fixed, moving=p, transformlist=reg["fwdtransforms"], interpolator="linear").numpy())
    return np.stack(out)


def main() -> int:
    if not DATA.exists():
        raise SystemExit(f"{DATA} missing: this experiment needs ../shared/data")
    t_all = time.time()
    cases = [tl.load_case(DATA / n) for n in sorted(p.name for p in DATA.iterdir())]
    refs = [ef.reference_partition(c, tl.case_points(c)) for c in cases]
    per_case = {}
    for i, target in enumerate(cases):
        t0 = time.time()
        named = tl.named_fissure_voxels(target.lungs, target.fissures)
        fused = np.zeros(target.lungs.shape, np.uint8)
        for side, labs in SIDES.items():
            probs = sum(warp_lobe_probs(target, atlas, refs[j], side) for j, atlas in enumerate(cases) if j != i)
            m = target.lungs == side
            fused[m] = np.array(labs)[probs.argmax(0)][m]
        fused = enforce_connectivity(fused, target.lungs)
        d = ef.fissure_distances(fused, named, target.spacing)
        per_case[target.name] = {"mean_distance_mm": round(ef._voxel_weighted_mean(d), 2),
                                 "per_fissure_mean_mm": {k: round(v["mean_mm"], 2) for k, v in d.items()},
                                 "mean_dice_vs_reference": round(float(np.nanmean(list(ef.lobe_dice(fused, refs[i]).values()))), 3),
                                 "seconds": round(time.time() - t0, 1)}
        print(target.name, per_case[target.name], flush=True)
    result = {
        "what": "multi-atlas lobes (ANTsPy SyN of the other LIDC lung masks, per side, mean of warped one-hot lobes), "
                "leave-one-out over the 3 LIDC cases; compare lobes_bench.json lidc_leave_one_out (shape prior lobes/v1)",
        "per_case": per_case,
        "mean_distance_mm": round(float(np.mean([r["mean_distance_mm"] for r in per_case.values()])), 2),
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "wall_s": round(time.time() - t_all, 1),
    }
    out = REPO / "bench" / "results" / "lobes_atlas.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"mean {result['mean_distance_mm']} mm; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

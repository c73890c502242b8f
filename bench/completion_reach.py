"""Experiment: does letting the infection model look further beyond the lung border help?

Lung completion (covidtrack.segment.completion) adds dense infection that touches the lungs within
``REACH_MM`` (15 mm) of the lung mask. On the phantoms most of the POI error of phantom 2003 is
consolidation outside the lung mask (-3.2 pp). This runs ``evaluate phantoms`` (seeds 2000-2004)
and ``segment()`` on the three healthy real CTs (false-positive infection) with other reaches.

    COVIDTRACK_THREADS=2 nice -n 5 python bench/completion_reach.py 15 25 40
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "completion_reach.json"
CT = REPO.parent / "shared" / "data" / "ct"


def run(reach: float) -> dict:
    from covidtrack.io import load_ct
    from covidtrack.segment import completion, segment
    from covidtrack.segment import eval_phantoms as ep

    completion.complete_lungs.__defaults__ = (None, reach)  # (progress, reach_mm)
    res = ep.evaluate(5, log=lambda *a: None)
    rows = res.get("phantoms") or res.get("rows") or []
    per = [{k: (p.get(k) if isinstance(p, dict) else getattr(p, k, None))
            for k in ("seed", "infection_dice", "lung_dice", "poi_error_pp", "poi_error_parts_pp")} for p in rows]
    real = {}
    for name in ("chest4dct_phase00/dicom", "lung-pet-ct-dx_A0001/dicom", "cip_copdgene_ct64/ct-64.nrrd"):
        vol = load_ct(CT / name)
        seg = segment(vol, lobes=False)
        ml = vol.voxel_volume_ml
        real[name.split("/")[0]] = {"lung_ml": round(float((seg.lungs > 0).sum() * ml), 1),
                                    "infection_ml": round(float((seg.infection > 0).sum() * ml), 1)}
    return {"reach_mm": reach, "phantoms": res["summary"], "per_phantom": per, "real_ct_false_positive": real,
            "model_versions": res.get("model_versions")}


def main(argv: list[str]) -> int:
    reaches = [float(a) for a in argv] or [15.0, 25.0, 40.0]
    t0 = time.time()
    out = {
        "what": "lung completion reach (mm beyond the lung mask where dense infection may join the lungs): phantom infection Dice / "
                "POI error (evaluate phantoms, seeds 2000-2004) and infection mL on the three healthy real CTs (all false positive)",
        "runs": [run(r) for r in reaches],
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How long do the product's HITL operations take on the CPU? (retrain "within minutes" check)

Builds a store of N phantom scans (covidtrack.phantom at the demo grid) whose "model output" is
the truth degraded (some lesions dropped, the rest dilated by one voxel), stores the truth as the
reviewer's correction, then times, with the ACTIVE infection model (the shipped one when present,
else a freshly initialised network of the shipped architecture -- timings do not depend on the
weights):

- the agreement table of model vs reviewers (covidtrack.hitl.agreement: two masks read per scan);
- scoring the review queue (one forward pass per scan, entropy inside the lungs);
- export of the corrected slices + a full fine-tuning job (covidtrack.hitl.retrain.run_job: the
  original training slices + corrected slices, evaluation of old and new on the fixed validation
  set and the held-out corrected scans, version folder written);
- promotion and re-segmentation of the N stored scans with the new version.

    COVIDTRACK_THREADS=2 nice -n 5 python bench/hitl_retrain.py --scans 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "hitl_retrain.json"


def _degrade(infection: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    comps, n = ndimage.label(infection > 0)
    out = infection.copy()
    for i in range(1, n + 1):
        if rng.random() < 0.3:
            out[comps == i] = 0  # a missed lesion
    grown = ndimage.binary_dilation(out > 0)
    return np.where(grown & (out == 0), 1, out).astype(np.uint8)  # over-segmented borders, as GGO


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=10)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="hitl-retrain-bench-"))
    os.environ["COVIDTRACK_HOME"] = str(home)
    from covidtrack import modelstore
    from covidtrack.config import settings
    from covidtrack.errors import ModelError
    from covidtrack.hitl import active, corrections, retrain
    from covidtrack.phantom import DEMO_SHAPE, DEMO_SPACING, make_phantom
    from covidtrack.pipeline import drain, ingest
    from covidtrack.segment.infection import NetSpec, build_network, save_weights, write_card
    from covidtrack.segment.types import Segmentation
    from covidtrack.store import Store

    timings: dict[str, float] = {}
    try:
        try:
            base = modelstore.active("infection")
            base_kind = "shipped"
        except ModelError:
            import torch

            torch.manual_seed(0)
            spec = NetSpec()
            folder = settings().models_dir / "infection" / "v1"
            sha = save_weights(build_network(spec), spec, folder / "weights.pt")
            write_card(folder, {"task": "infection", "version": "v1", "weights_sha256": sha, "net": {"kind": "MONAI UNet 2D", **spec.to_json()}})
            base = modelstore.set_active("infection", "v1")
            base_kind = "freshly initialised (no shipped infection model in this checkout)"
        rng = np.random.default_rng(0)
        t0 = time.time()
        with Store.open() as store:
            for i in range(args.scans):
                vol, truth = make_phantom(8000 + i, shape=DEMO_SHAPE, spacing=DEMO_SPACING)
                model_out = _degrade(truth.infection.astype(np.uint8), rng)

                def segmenter(volume, progress=None, lungs=truth.lungs, inf=model_out, lobes=truth.lobes):  # noqa: ANN001
                    return Segmentation(lungs=lungs.astype(np.uint8), infection=np.where(lungs > 0, inf, 0).astype(np.uint8),
                                        lobes=lobes.astype(np.uint8), model_versions={"lungs": "lungs/sim", "infection": base.name})

                res = drain(ingest(vol, f"BENCH-{i}", dt.date(2020, 4, 1) + dt.timedelta(days=i), store=store, segmenter=segmenter, register=False))
                eff = corrections.effort_between(model_out, truth.infection.astype(np.uint8))
                corrections.save_correction(store, res.scan_id, truth.infection.astype(np.uint8), eff, author="bench")
            timings["build_store_s"] = round(time.time() - t0, 1)
            scans = list(store.scans()["scan_id"])
            from covidtrack.hitl import agreement
            from covidtrack.segment.infection import InfectionModel

            t0 = time.time()
            agree = agreement.agreement_summary(agreement.agreement_table(store))
            timings["agreement_s"] = round(time.time() - t0, 2)

            t0 = time.time()
            active.score_scans(store, scans, model=InfectionModel.load(base))
            timings["score_queue_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            job = retrain.prepare_job(store, retrain.RetrainConfig(iterations=args.steps))
            timings["export_s"] = round(time.time() - t0, 1)
            exported = json.loads((job.folder / "config.json").read_text())["exported"]
            t0 = time.time()
            result = retrain.run_job(job.folder, echo=False)
            timings["finetune_job_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            retrain.promote(store, result["version"])
            added = retrain.resegment(store)
            timings["resegment_s"] = round(time.time() - t0, 1)
        out = {
            "what": "wall time of the HITL operations of the product on phantom scans with stored corrections",
            "data": f"{args.scans} phantom scans {DEMO_SHAPE} voxels at {DEMO_SPACING} mm (covidtrack.phantom, seeds 8000+); "
                    "corrections = phantom truth; original training slices = MedSeg (../shared) when present",
            "model": {"base": base.name, "base_kind": base_kind, "net": base.card()["net"], "new": result["version"]},
            "finetune": {"steps": args.steps, "batch_size": retrain.RetrainConfig.batch_size, "corrected_slices": exported["slices"],
                         "held_out_scans": len(exported["held_out_scans"]), "held_out_slices": exported["held_out_slices"],
                         "held_out_note": "reviewed hold-out (retrain.holdout_patients, one patient in five by a fixed hash "
                                          "of the patient key): never trained on, scored as 'dice_reviewed'",
                         "original_data": "MedSeg slices (../shared)" if retrain.default_original_data() else "phantom replay"},
            "validation_dice": {"old": result["old"], "new": result["new"]},
            "agreement": {"what": "hitl.agreement on the stored corrections: the simulated model output (truth with lesions "
                                  "dropped and the rest dilated) against the truth; checks the sums, not a real model",
                          "summary": json.loads(agree.to_json(orient="records"))},
            "resegmented_scans": len(added),
            "timings_s": timings,
            "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                         "threads": settings().threads, "note": "2 CPU cores shared by ~8 engineers; timings are noisy"},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(json.dumps(out, indent=1))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

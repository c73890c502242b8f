"""Prepare the auxiliary training slices of the infection model as one ``.npz``.

Auxiliary slices fill a fixed share of each training batch (``TrainConfig.aux_fraction``) next to
the real expert-labelled slices; they never replace them:

- healthy-lung negatives (label 0) from two real chest CTs, Lung-PET-CT-Dx A0001 and the CIP
  COPDGene 64^3 case (chest4dct is left out: it is the held-out false-positive check);
- healthy phantoms (label 0), seeds 1000..;
- sick phantoms with their true GGO/consolidation, seeds 3000.. (evaluation phantoms use 2000..).

The file lets training run where the CT files are not (e.g. a GPU machine):

    python bench/infection_aux.py --out aux.npz
    python -m covidtrack train infection --aux-npz aux.npz ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.segment.train_infection import (  # noqa: E402
    negatives_from_files,
    negatives_from_phantoms,
    phantom_slices,
    save_pairs,
)

CT = REPO.parent / "shared" / "data" / "ct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--healthy-phantoms", type=int, default=4)
    parser.add_argument("--sick-phantoms", type=int, default=12)
    parser.add_argument("--stride", type=int, default=2)
    args = parser.parse_args()
    t0 = time.time()
    real = negatives_from_files([CT / "lung-pet-ct-dx_A0001" / "dicom", CT / "cip_copdgene_ct64" / "ct-64.nrrd"], args.stride)
    healthy = negatives_from_phantoms(args.healthy_phantoms, args.stride)
    sick = phantom_slices(range(3000, 3000 + args.sick_phantoms), args.stride)
    pairs = real + healthy + sick
    save_pairs(args.out, pairs)
    info = {
        "sources": "healthy lung slices of Lung-PET-CT-Dx A0001 and CIP COPDGene ct-64 (label 0); healthy phantoms "
        f"seeds 1000-{999 + args.healthy_phantoms} (label 0); sick phantoms seeds 3000-{2999 + args.sick_phantoms} with "
        f"their true lesions; one lung slice in {args.stride}",
        "real_negative_slices": len(real),
        "phantom_negative_slices": len(healthy),
        "phantom_positive_slices": len(sick),
        "phantom_positive_infected_fraction": float(np.mean([np.mean(lab > 0) for _, lab in sick])) if sick else 0.0,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

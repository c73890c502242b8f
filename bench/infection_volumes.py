"""Infection model on whole CT volumes: real chest CTs (false positives, speed) and phantoms (Dice).

Real CTs have no infection masks here and none of them is a COVID-19 case, so every infected
millilitre reported on them is a false positive (the chest4dct series has a left hilar mass and the
Lung-PET-CT-Dx case a lung cancer: tumour called "consolidation" is counted as a false positive
too). The lung mask comes from the classical extraction in
:mod:`covidtrack.segment.lung_targets` so this bench depends on the infection model only.
Overlays go to bench/figures/infection_<case>.png for inspection by eye.

    COVIDTRACK_THREADS=2 nice -n 5 python bench/infection_volumes.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import REPO_ROOT, settings  # noqa: E402
from covidtrack.segment.infection import InfectionModel  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data" / "ct"
CASES = {
    "chest4dct_phase00": SHARED / "chest4dct_phase00" / "dicom",
    "lung-pet-ct-dx_A0001": SHARED / "lung-pet-ct-dx_A0001" / "dicom",
    "cip_copdgene_ct64": SHARED / "cip_copdgene_ct64" / "ct-64.nrrd",
}
FIGURES = REPO / "bench" / "figures"


def overlay(name: str, hu: np.ndarray, lungs: np.ndarray, labels: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = np.nonzero(lungs.any(axis=(1, 2)))[0]
    levels = [int(zs[int(f * (len(zs) - 1))]) for f in (0.3, 0.55, 0.8)]
    y = int(np.median(np.nonzero(lungs)[1]))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    panels = [(hu[z], lungs[z], labels[z], f"axial z={z}") for z in levels]
    panels.append((hu[::-1, y], lungs[::-1, y], labels[::-1, y], f"coronal y={y} (head up)"))
    for ax, (img, lung, lab, title) in zip(axes, panels):
        ax.imshow(np.clip(img, -1200, 200), cmap="gray", aspect="auto" if "coronal" in title else "equal")
        ax.contour(lung > 0, levels=[0.5], colors="deepskyblue", linewidths=0.6)
        rgba = np.zeros((*lab.shape, 4))
        rgba[lab == 1] = (1.0, 0.85, 0.0, 0.55)  # GGO yellow
        rgba[lab == 2] = (1.0, 0.1, 0.1, 0.65)  # consolidation red
        ax.imshow(rgba, aspect="auto" if "coronal" in title else "equal")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{name}: lungs (blue contour), GGO (yellow), consolidation (red); patient right on image left")
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / f"infection_{name}.png"
    fig.savefig(out, dpi=70, bbox_inches="tight")
    plt.close(fig)
    return out


def real_cases(model: InfectionModel) -> list[dict]:
    from covidtrack.io import load_ct
    from covidtrack.segment.lung_targets import extract_lungs

    rows = []
    for name, path in CASES.items():
        if not path.exists():
            print(f"skip {name}: {path} missing")
            continue
        vol = load_ct(path)
        lungs, _ = extract_lungs(vol)
        t0 = time.perf_counter()
        labels, prob = model.predict(vol.array, lungs, vol.spacing)
        secs = time.perf_counter() - t0
        ml = vol.voxel_volume_ml
        row = {
            "case": name,
            "shape": list(vol.shape),
            "spacing_mm": list(vol.spacing),
            "lung_ml": round(float((lungs > 0).sum()) * ml, 1),
            "false_positive_ggo_ml": round(float((labels == 1).sum()) * ml, 1),
            "false_positive_consolidation_ml": round(float((labels == 2).sum()) * ml, 1),
            "false_positive_percent_of_lung": round(100.0 * float((labels > 0).sum()) / max(1, int((lungs > 0).sum())), 2),
            "infection_seconds": round(secs, 2),
            "figure": str(overlay(name, vol.array, lungs, labels).relative_to(REPO)),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def phantoms(model: InfectionModel, seeds: tuple[int, ...] = (1, 2)) -> list[dict]:
    from covidtrack.phantom import make_phantom

    rows = []
    for seed in seeds:
        for healthy in (False, True):
            vol, truth = make_phantom(seed, (80, 160, 160), (4.0, 2.2, 2.2), healthy=healthy)
            labels, _ = model.predict(vol.array, truth.lungs, vol.spacing)
            p, t = labels > 0, truth.infection > 0
            denom = int(p.sum() + t.sum())
            ml = vol.voxel_volume_ml
            rows.append(
                {
                    "seed": seed,
                    "healthy": healthy,
                    "infection_dice": None if denom == 0 else round(2 * int((p & t).sum()) / denom, 3),
                    "true_infection_ml": round(float(t.sum()) * ml, 1),
                    "predicted_infection_ml": round(float(p.sum()) * ml, 1),
                    "poi_true_percent": round(100 * float(t.sum()) / int((truth.lungs > 0).sum()), 2),
                    "poi_pred_percent": round(100 * float(p.sum()) / int((truth.lungs > 0).sum()), 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    model = InfectionModel.load()
    result = {
        "what": "infection model on whole volumes: false-positive volume on real non-COVID chest CTs "
        "(classical lung mask), infection Dice / POI on phantoms (truth lung mask), inference seconds",
        "model_version": model.version,
        "tta": model.tta,
        "hardware": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": settings().threads,
            "note": "2 CPU cores shared with other jobs; timings are upper bounds",
        },
        "real_ct": real_cases(model),
        "phantoms": phantoms(model),
    }
    out = REPO / "bench" / "results" / "infection_volumes.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

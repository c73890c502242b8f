"""Does a post-processing of the infection probabilities help on slices no model saw?

Input: out-of-fold probabilities written by ``bench/infection_cv.py --save-probs DIR`` (each
fold's model predicting the 10 MedSeg slices it never saw, flip TTA). Every variant below turns
the same probabilities into labels; the script scores each against the expert masks with the
evaluator of ``python -m covidtrack evaluate slices`` (mean over the 50 slices and over folds).

Variants (study only; the product keeps ``base``, see the README):
- ``base``: the product rule, infection where P(GGO) + P(consolidation) >= 0.5;
- ``thr_T``: the same with threshold T;
- ``hyst_L``: hysteresis, regions of P >= L kept where they hold a pixel with P >= 0.5;
- ``cons_B``: consolidation where P(cons) > B x P(GGO) (B < 1 favours consolidation);
- ``husplit_H``: the product's infection mask, typed by density (consolidation above H HU).

    python bench/infection_cv.py --name oof700 --size 256 --iterations 700 --batch-size 16 \\
        --intensity-aug 0.35 --aux-npz aux.npz --save-probs /tmp/oof/probs --out /tmp/oof/parts
    python bench/infection_postprocess.py --probs /tmp/oof/probs [--volumes] [--json bench/results/infection_postprocess.json]
    python bench/infection_postprocess.py --probs /tmp/oof/probs --errors --json bench/results/infection_errors.json
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.segment.eval_slices import METRICS, score_slice, summarize  # noqa: E402
from covidtrack.segment.infection import labels_from_probs  # noqa: E402


def grow_hysteresis(labels: np.ndarray, p_inf: np.ndarray, low: float) -> np.ndarray:
    """``labels`` grown (as GGO) into the connected regions of ``p_inf >= low`` that touch them (2D or 3D)."""
    from scipy import ndimage as ndi

    seeds = labels > 0
    comp, n = ndi.label((p_inf >= low) | seeds)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(comp[seeds])] = True
    keep[0] = False
    return np.where(keep[comp] & ~seeds, 1, labels).astype(np.uint8)


def hysteresis_labels(probs: np.ndarray, low: float) -> np.ndarray:
    labels, p_inf = labels_from_probs(probs)
    return grow_hysteresis(labels, p_inf, low)


def hu_split_labels(probs: np.ndarray, image: np.ndarray, hu: float) -> np.ndarray:
    """The product's infection mask, typed by density: consolidation where the smoothed image is above ``hu``."""
    from scipy import ndimage as ndi

    from covidtrack.segment.intensity import hu_from_unit

    labels, _ = labels_from_probs(probs)
    dense = hu_from_unit(ndi.gaussian_filter(image, 1.0)) > hu
    return np.where(labels > 0, np.where(dense, 2, 1), 0).astype(np.uint8)


VARIANTS = {  # each: (probabilities (3, H, W), unit image) -> labels
    "base": lambda p, img: labels_from_probs(p)[0],
    **{f"thr_{t}": (lambda p, img, t=t: labels_from_probs(p, t)[0]) for t in (0.3, 0.4, 0.6)},
    **{f"hyst_{lo}": (lambda p, img, lo=lo: hysteresis_labels(p, low=lo)) for lo in (0.2, 0.3, 0.4)},
    **{f"cons_{b}": (lambda p, img, b=b: labels_from_probs(p, cons_bias=b)[0]) for b in (0.6, 0.8)},
    **{f"husplit_{h}": (lambda p, img, h=h: hu_split_labels(p, img, h)) for h in (-450, -350, -250)},
}


def load_folds(folder: Path) -> list[list[dict]]:
    folds = []
    for f in sorted(folder.glob("fold*.npz")):
        d = np.load(f)
        names = [str(n) for n in d["names"]]
        folds.append([{"name": n, "probs": d[f"probs_{i}"].astype(np.float32), "image": d[f"image_{i}"].astype(np.float32), "classes": d[f"classes_{i}"],
                       "infection": d[f"infection_{i}"]} for i, n in enumerate(names)])
    return folds


def volume_study(log=print) -> dict:
    """The same threshold / hysteresis variants on whole volumes through ``segment()`` (lungs,
    completion, infection; the active models): Dice and POI error on the evaluation phantoms,
    infected mL on the three healthy real CTs. Volumes keep only P(infection), so voxels a variant
    adds are counted as GGO."""
    from covidtrack.config import REPO_ROOT
    from covidtrack.io import load_ct
    from covidtrack.phantom import make_phantom  # type: ignore[attr-defined]
    from covidtrack.segment.api import segment
    from covidtrack.segment.eval_phantoms import dice, poi_pct

    def variants(seg) -> dict[str, np.ndarray]:
        p = seg.infection_prob.astype(np.float32)
        out = {"base": seg.infection}
        for t in (0.3, 0.4):
            out[f"thr_{t}"] = np.where((seg.infection == 0) & (p >= t), 1, seg.infection)
        for lo in (0.2, 0.3, 0.4):
            out[f"hyst_{lo}"] = grow_hysteresis(seg.infection, p, lo)
        return {k: np.where(seg.lungs > 0, v, 0) for k, v in out.items()}

    result: dict = {"phantoms": {}, "healthy_real_ct_infected_ml": {}}
    for seed in (2000, 2001, 2002):
        vol, truth = make_phantom(seed)
        seg = segment(vol, lobes=False)
        result["model_versions"] = seg.model_versions
        truth_poi = poi_pct(truth.lungs, truth.infection)
        result["phantoms"][seed] = {k: {"infection_dice": round(dice(v > 0, truth.infection > 0), 4),
                                        "poi_error_pp": round(poi_pct(seg.lungs, v) - truth_poi, 2)} for k, v in variants(seg).items()}
        log(f"phantom {seed}: {result['phantoms'][seed]}")
    ct = REPO_ROOT.parent / "shared" / "data" / "ct"
    for name, path in (("chest4dct_phase00", ct / "chest4dct_phase00" / "dicom"), ("lung-pet-ct-dx_A0001", ct / "lung-pet-ct-dx_A0001" / "dicom"),
                       ("cip_copdgene_ct64", ct / "cip_copdgene_ct64" / "ct-64.nrrd")):
        if not path.exists():
            log(f"{path} missing: skipped")
            continue
        vol = load_ct(path)
        seg = segment(vol, lobes=False)
        ml = float(np.prod(vol.spacing)) / 1000.0
        result["healthy_real_ct_infected_ml"][name] = {k: round(float((v > 0).sum()) * ml, 1) for k, v in variants(seg).items()}
        log(f"{name}: {result['healthy_real_ct_infected_ml'][name]}")
    return result


def _score(folds: list[list[dict]], key: str = "probs") -> dict:
    per_fold = [summarize([score_slice(s["name"], labels_from_probs(s[key])[0], s["infection"], s["classes"]) for s in fold]) for fold in folds]
    out = {m: float(np.mean([f[m]["mean"] for f in per_fold if f[m]["mean"] is not None])) for m in METRICS}
    out["per_fold_dice"] = [round(f["dice"]["mean"], 4) for f in per_fold]
    return out


def ensemble_study(a: list[list[dict]], b: list[list[dict]], args: argparse.Namespace) -> int:
    """Two models per fold (training seeds differ): each alone and the mean of their probabilities."""
    if [[s["name"] for s in f] for f in a] != [[s["name"] for s in f] for f in b]:
        raise SystemExit("the two folders hold different folds or slices")
    for fa, fb in zip(a, b):
        for sa, sb in zip(fa, fb):
            sa["mean_probs"] = 0.5 * (sa["probs"] + sb["probs"])
    result = {"model_a": _score(a), "model_b": _score(b), "mean_of_both": _score(a, "mean_probs")}
    for k, r in result.items():
        print(f"{k:12s} " + "  ".join(f"{m} {r[m]:.3f}" for m in METRICS) + f"  folds {r['per_fold_dice']}")
    if args.json:
        args.json.write_text(json.dumps({
            "what": "two-model ensemble (mean of softmax probabilities) vs each model, out-of-fold MedSeg slices, threshold 0.5",
            "models": [args.probs.name, args.ensemble.name],
            "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
            "result": result}, indent=2) + "\n")
    return 0


def error_study(folds: list[list[dict]], args: argparse.Namespace) -> int:
    """Where the unseen-slice errors come from: pixel confusion between expert and model classes,
    and two oracles that each fix one half of the task: the expert's extent typed by the model,
    and the model's extent typed by the expert (model pixels the expert left clear count as GGO)."""
    conf = np.zeros((3, 3), np.int64)
    variants: dict[str, list] = {"model": [], "expert_extent_model_type": [], "model_extent_expert_type": []}
    for fold in folds:
        for s in fold:
            labels, _ = labels_from_probs(s["probs"])
            gt = s["classes"]
            np.add.at(conf, (gt.ravel(), labels.ravel()), 1)
            typed = np.where(s["probs"][2] > s["probs"][1], 2, 1)
            variants["model"].append(score_slice(s["name"], labels, s["infection"], gt))
            variants["expert_extent_model_type"].append(score_slice(s["name"], np.where(gt > 0, typed, 0), s["infection"], gt))
            variants["model_extent_expert_type"].append(score_slice(s["name"], np.where(labels > 0, np.where(gt == 2, 2, 1), 0),
                                                                    s["infection"], gt))
    names = ("clear", "GGO", "consolidation")
    result = {
        "what": "error analysis of out-of-fold infection labels (product rule, threshold 0.5) on the 50 MedSeg slices: "
                "pixel confusion (for each expert class, the share of its pixels the model labels clear / GGO / consolidation) and two oracles",
        "data": f"{sum(len(f) for f in folds)} MedSeg slices in {len(folds)} folds (bench/infection_cv.py fold assignment)",
        "probabilities": str(args.probs.name),
        "model": "the out-of-fold models that wrote --probs (bench/infection_cv.py --save-probs): each fold's model "
                 "scores only the 10 slices it never saw; not a shipped version",
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "confusion_share_of_expert_class": {names[i]: {names[j]: round(float(conf[i, j] / max(conf[i].sum(), 1)), 4) for j in range(3)}
                                            for i in range(3)},
        "mean_over_slices": {k: {m: summarize(v)[m]["mean"] for m in ("dice", "dice_ggo", "dice_consolidation")} for k, v in variants.items()},
        "slices_without_expert_ggo_but_model_ggo": [sc.name for sc in variants["model"] if sc.dice_ggo == 0.0
                                                     and not (next(s for f in folds for s in f if s["name"] == sc.name)["classes"] == 1).any()],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probs", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--volumes", action="store_true", help="also run the variants on phantoms and healthy real CTs (~3 min)")
    ap.add_argument("--errors", action="store_true", help="error analysis (confusion, oracles) instead of the variants")
    ap.add_argument("--ensemble", type=Path, help="a second out-of-fold folder (same folds, another training seed): "
                    "score each model and their mean instead of the variants")
    args = ap.parse_args()
    folds = load_folds(args.probs)
    if not folds:
        raise SystemExit(f"{args.probs}: no fold*.npz; run bench/infection_cv.py --save-probs {args.probs} first")
    if args.errors:
        return error_study(folds, args)
    if args.ensemble:
        return ensemble_study(folds, load_folds(args.ensemble), args)
    result = {}
    for name, fn in VARIANTS.items():
        per_fold = [summarize([score_slice(s["name"], fn(s["probs"], s["image"]), s["infection"], s["classes"]) for s in fold]) for fold in folds]
        all_scores = [score_slice(s["name"], fn(s["probs"], s["image"]), s["infection"], s["classes"]) for fold in folds for s in fold]
        overall = summarize(all_scores)
        result[name] = {m: {"mean_over_folds": float(np.mean([f[m]["mean"] for f in per_fold if f[m]["mean"] is not None])),
                            "mean_over_slices": overall[m]["mean"]} for m in METRICS}
        true_area = sum(float((s["infection"] > 0).sum()) for fold in folds for s in fold)
        pred_area = sum(float((fn(s["probs"], s["image"]) > 0).sum()) for fold in folds for s in fold)
        result[name]["area_ratio_pred_to_true"] = round(pred_area / true_area, 4)
        print(f"{name:10s} " + "  ".join(f"{m} {result[name][m]['mean_over_folds']:.3f}" for m in METRICS)
              + f"  area pred/true {result[name]['area_ratio_pred_to_true']:.3f}")
    if args.json:
        out = {
            "what": "post-processing variants of the infection probabilities, scored on out-of-fold MedSeg slices",
            "data": f"{sum(len(f) for f in folds)} MedSeg slices in {len(folds)} folds (bench/infection_cv.py fold assignment)",
            "probabilities": str(args.probs.name),
            "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
            "variants": result,
            "volumes": volume_study() if args.volumes else None,
            "decision": "keep base (threshold 0.5): on unseen real slices no variant moves Dice by more than "
                        "0.003 and base already calls 1.4 % more area than the experts; lower thresholds help "
                        "the phantoms' faint synthetic ground glass but add false positives on healthy real CTs; "
                        "a density split at -450 HU gains 0.03 consolidation Dice, within the fold spread and "
                        "picked on these slices, so it is not shipped",
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

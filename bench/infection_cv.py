"""5-fold cross-validation of the infection training recipe on the 50 MedSeg slices.

Each fold trains the full recipe (teacher, then self-trained student) on 40 slices and scores
the 10 slices it never saw: the teacher alone (flip TTA), the student without TTA and the student
with TTA (the shipped configuration). The unlabelled slices are used in every fold (they carry
no labels, so no held-out label leaks). Folds can run as separate processes
(``--folds 0,2``); ``--aggregate`` merges the per-fold files into bench/results/infection_cv.json.
A recipe other than the default is a named variant (``--name``): its folds go to
``infection_cv_parts/<name>/`` and its aggregate to ``infection_cv_<name>.json``.

    COVIDTRACK_THREADS=1 nice -n 5 python bench/infection_cv.py --folds 0,1
    python bench/infection_cv.py --aggregate
    python bench/infection_cv.py --name s256 --size 256 --iterations 2500 --batch-size 16 \
        --intensity-aug 0.35 --aux-npz aux.npz --device cuda --folds 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import REPO_ROOT  # noqa: E402
from covidtrack.segment.eval_slices import METRICS, evaluate_model_on_samples, scores_to_json  # noqa: E402
from covidtrack.segment.infection import InfectionModel, NetSpec  # noqa: E402
from covidtrack.segment.train_infection import SHARED_COVID2D, TrainConfig, fit_recipe, labelled_pairs, record_validation  # noqa: E402

RESULTS = REPO / "bench" / "results"
PARTS = RESULTS / "infection_cv_parts"
N_FOLDS = 5
SEED = 0


def fold_of(names: list[str]) -> dict[str, int]:
    """Seeded assignment of slice names to 5 folds of equal size."""
    order = np.random.default_rng(SEED).permutation(sorted(names, key=lambda n: (len(n), n)))
    return {str(n): i % N_FOLDS for i, n in enumerate(order)}


def run_fold(k: int, cfg: TrainConfig, images: Path | None = None, unlabeled: Path | None = None,
             save_probs: Path | None = None) -> dict:
    from covidtrack.segment.intensity import unit_from_uint8
    from covidtrack.segment.slices import read_medseg_folder, read_unlabeled

    d = images or SHARED_COVID2D / "medseg_train"
    samples = read_medseg_folder(d / "Imgs", d / "GT", d / "GT_multiclass")
    folds = fold_of([s.name for s in samples])
    train = [s for s in samples if folds[s.name] != k]
    test = [s for s in samples if folds[s.name] == k]
    unl = []
    if cfg.student_iterations > 0:
        unl = [unit_from_uint8(s.image) for s in read_unlabeled(unlabeled or SHARED_COVID2D / "unlabeled_slices", stride=cfg.unlabeled_stride)]
    out: dict = {"fold": k, "test_names": [s.name for s in test], "train_slices": len(train)}

    def score_teacher(net: object) -> None:
        out["teacher_tta"] = scores_to_json(evaluate_model_on_samples(InfectionModel(net, cfg.spec, "teacher", tta=True), test))  # type: ignore[arg-type]
        print(f"fold {k} teacher Dice {out['teacher_tta']['mean']['dice']['mean']:.3f}", flush=True)

    t0 = time.time()
    net, info = fit_recipe(labelled_pairs(train), unl, cfg, log=lambda m: print(f"fold {k} {m}", flush=True), on_teacher=score_teacher)
    out["train_s"] = round(time.time() - t0, 1)
    out["info"] = info
    out["student_no_tta"] = scores_to_json(evaluate_model_on_samples(InfectionModel(net, cfg.spec, "student", tta=False), test))
    t1 = time.time()
    out["student_tta"] = scores_to_json(evaluate_model_on_samples(InfectionModel(net, cfg.spec, "student", tta=True), test))
    out["predict_s_per_slice_tta"] = round((time.time() - t1) / len(test), 3)
    print(f"fold {k} student Dice {out['student_tta']['mean']['dice']['mean']:.3f} ({out['train_s']:.0f} s)", flush=True)
    if save_probs is not None:  # out-of-fold probabilities, for post-processing studies (bench/infection_postprocess.py)
        model = InfectionModel(net, cfg.spec, "student", tta=True)
        images = [unit_from_uint8(s.image) for s in test]
        probs = model.slice_probabilities(images)
        save_probs.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            save_probs / f"fold{k}.npz", names=np.array([s.name for s in test]),
            **{f"image_{i}": img.astype(np.float16) for i, img in enumerate(images)},
            **{f"probs_{i}": p.astype(np.float16) for i, p in enumerate(probs)},
            **{f"classes_{i}": s.classes for i, s in enumerate(test)},
            **{f"infection_{i}": s.infection for i, s in enumerate(test)},
        )
    return out


def parts_dir(name: str) -> Path:
    return PARTS if name == "default" else PARTS / name


def aggregate(name: str = "default") -> dict:
    d = parts_dir(name)
    parts = [json.loads((d / f"fold{k}.json").read_text()) for k in range(N_FOLDS) if (d / f"fold{k}.json").exists()]
    if len(parts) != N_FOLDS:
        print(f"warning: only {len(parts)} of {N_FOLDS} folds present", file=sys.stderr)
    result: dict = {
        "description": f"{len(parts)}-fold cross-validation on the 50 MedSeg slices (10 unseen slices per fold), "
        "per-image Dice averaged per fold; mean and std over folds; shipped configuration = student with flip TTA",
        "data": "MedSeg COVID-19 CT segmentation, 50 labelled slices (Inf-Net TrainingSet @ c17e524); "
        "COVID-19-CT-Seg unlabelled slices for self-training (non-commercial licence)",
        "config": parts[0]["config"] if parts else None,
        "variant": name,
        "hardware": parts[0].get("hardware") if parts and parts[0].get("hardware") else {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "note": "2 CPU cores shared with ~8 other jobs; one thread per fold process",
        },
        "variants": {},
    }
    for variant in ("teacher_tta", "student_no_tta", "student_tta"):
        fold_means = {m: [p[variant]["mean"][m]["mean"] for p in parts if p[variant]["mean"][m]["mean"] is not None] for m in METRICS}
        pooled = [row for p in parts for row in p[variant]["per_image"]]
        result["variants"][variant] = {
            m: {
                "mean_over_folds": float(np.mean(v)) if v else None,
                "std_over_folds": float(np.std(v)) if v else None,
                "per_fold": v,
                "mean_over_images": float(np.nanmean([np.nan if r[m] is None else r[m] for r in pooled])),
            }
            for m, v in fold_means.items()
        }
    shipped = result["variants"]["student_tta"]
    result["summary"] = {m: {"mean": shipped[m]["mean_over_folds"], "std": shipped[m]["std_over_folds"]} for m in METRICS}
    result["per_image_student_tta"] = sorted(
        ({"fold": p["fold"], **row} for p in parts for row in p["student_tta"]["per_image"]), key=lambda r: (len(r["name"]), r["name"])
    )
    result["train_s_per_fold"] = [p["train_s"] for p in parts]
    result["predict_s_per_slice_tta"] = [p["predict_s_per_slice_tta"] for p in parts]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--card", type=Path, help="with --aggregate: model version folder whose card gets the results")
    parser.add_argument("--name", default="default", help="variant name (default: the recipe of infection/v1)")
    parser.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    parser.add_argument("--student-iterations", type=int, default=TrainConfig.student_iterations)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--size", type=int, default=NetSpec().input_size)
    parser.add_argument("--intensity-aug", type=float, default=TrainConfig.intensity_aug)
    parser.add_argument("--unlabeled-stride", type=int, default=TrainConfig.unlabeled_stride)
    parser.add_argument("--aux-npz", type=Path, nargs="*", default=[], help="auxiliary pairs (train_infection.save_pairs)")
    parser.add_argument("--aux-fraction", type=float, default=TrainConfig.aux_fraction)
    parser.add_argument("--images", type=Path, help="MedSeg folder with Imgs/ GT/ GT_multiclass/ (default ../shared)")
    parser.add_argument("--unlabeled", type=Path, help="unlabelled slices folder (default ../shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="parts folder (default bench/results/infection_cv_parts[/<name>])")
    parser.add_argument("--save-probs", type=Path, help="write each fold's out-of-fold probabilities here (foldK.npz)")
    parser.add_argument("--train-seed", type=int, default=SEED, help="training seed (the fold assignment always uses seed 0)")
    args = parser.parse_args()
    if args.aggregate:
        result = aggregate(args.name)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_json = RESULTS / ("infection_cv.json" if args.name == "default" else f"infection_cv_{args.name}.json")
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        if args.card:
            record_validation(
                args.card,
                {"description": result["description"], "summary": result["summary"], "variants": {
                    v: {m: {k: x[k] for k in ("mean_over_folds", "std_over_folds")} for m, x in ms.items()}
                    for v, ms in result["variants"].items()}, "source": f"bench/results/{out_json.name}"},
            )
        for v, ms in result["variants"].items():
            print(v, {m: None if x["mean_over_folds"] is None else round(x["mean_over_folds"], 3) for m, x in ms.items()})
        return 0
    from covidtrack.segment.train_infection import load_pairs

    aux: list = []
    for path in args.aux_npz:
        aux += load_pairs(path)
    cfg = TrainConfig(
        iterations=args.iterations, student_iterations=args.student_iterations, batch_size=args.batch_size, lr=args.lr,
        intensity_aug=args.intensity_aug, unlabeled_stride=args.unlabeled_stride, auxiliary=tuple(aux),
        aux_fraction=args.aux_fraction, device=args.device, seed=args.train_seed, spec=NetSpec(input_size=args.size),
    )
    out_dir = args.out or parts_dir(args.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in (int(f) for f in args.folds.split(",")):
        out = run_fold(k, cfg, args.images, args.unlabeled, args.save_probs)
        out["config"] = {
            "name": args.name,
            "net": cfg.spec.to_json(),
            "teacher_iterations": cfg.iterations,
            "student_iterations": cfg.student_iterations,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "intensity_aug": cfg.intensity_aug,
            "unlabeled_stride": cfg.unlabeled_stride,
            "auxiliary": [p.name for p in args.aux_npz],
            "auxiliary_slices": len(aux),
            "aux_fraction": cfg.aux_fraction,
            "seed": cfg.seed,
            "code_commit": os.popen(f"git -C {REPO_ROOT} rev-parse HEAD 2>/dev/null").read().strip() or "unknown",
        }
        out["hardware"] = {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "device": out["info"].get("device", "cpu")}
        (out_dir / f"fold{k}.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m covidtrack evaluate slices``: infection accuracy on a MedSeg-layout folder.

Per image: Dice, sensitivity and specificity of infection (GGO + consolidation together) against
the binary masks, and Dice of GGO and of consolidation against the multiclass masks. Means are
over images. Convention: a Dice (or sensitivity) whose reference and prediction are both empty
is undefined, reported as ``null`` and left out of the mean; an empty reference with a non-empty
prediction scores 0.

Predictions come from a model version (default: the active one) or, with ``--predictions DIR``,
from mask files (0/1/2 or 0/255, matched by name, in the same orientation as the images), so the
same command scores any other tool's output.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covidtrack.errors import InputError


@dataclass(frozen=True)
class SliceScore:
    """Scores of one image (fractions in [0, 1]; NaN when undefined, see the module docstring)."""

    name: str
    dice: float
    sensitivity: float
    specificity: float
    dice_ggo: float
    dice_consolidation: float
    infection_fraction_true: float  # share of the image's pixels that are infected in the reference
    infection_fraction_pred: float


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, r = pred.astype(bool), ref.astype(bool)
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom


def score_slice(name: str, pred_labels: np.ndarray, ref_infection: np.ndarray, ref_classes: np.ndarray | None) -> SliceScore:
    """Score predicted labels (0/1/2) against a binary infection mask and optional class mask."""
    if pred_labels.shape != ref_infection.shape:
        raise ValueError(f"{name}: prediction {pred_labels.shape} and reference {ref_infection.shape} differ in shape")
    p, r = pred_labels > 0, ref_infection > 0
    tp, fp = int((p & r).sum()), int((p & ~r).sum())
    fn, tn = int((~p & r).sum()), int((~p & ~r).sum())
    nan = float("nan")
    return SliceScore(
        name=name,
        dice=dice(p, r),
        sensitivity=tp / (tp + fn) if tp + fn else nan,
        specificity=tn / (tn + fp) if tn + fp else nan,
        dice_ggo=dice(pred_labels == 1, ref_classes == 1) if ref_classes is not None else nan,
        dice_consolidation=dice(pred_labels == 2, ref_classes == 2) if ref_classes is not None else nan,
        infection_fraction_true=float(r.mean()),
        infection_fraction_pred=float(p.mean()),
    )


METRICS = ("dice", "sensitivity", "specificity", "dice_ggo", "dice_consolidation")


def summarize(scores: Sequence[SliceScore]) -> dict[str, dict[str, float | int | None]]:
    """Mean, standard deviation and count (defined values only) of each metric over images."""
    out: dict[str, dict[str, float | int | None]] = {}
    for m in METRICS:
        vals = np.array([getattr(s, m) for s in scores], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[m] = {
            "mean": float(vals.mean()) if vals.size else None,
            "std": float(vals.std()) if vals.size else None,
            "n": int(vals.size),
        }
    return out


def _json_value(v: object) -> object:
    return None if isinstance(v, float) and math.isnan(v) else v


def scores_to_json(scores: Sequence[SliceScore]) -> dict:
    return {
        "per_image": [{k: _json_value(v) for k, v in asdict(s).items()} for s in scores],
        "mean": summarize(scores),
    }


def evaluate_model_on_samples(model: object, samples: Sequence[object]) -> list[SliceScore]:
    """Run an :class:`~covidtrack.segment.infection.InfectionModel` on canonical SliceSamples and score them."""
    from covidtrack.segment.intensity import unit_from_uint8

    preds = model.predict_slices([unit_from_uint8(s.image) for s in samples])  # type: ignore[attr-defined]
    return [
        score_slice(s.name, lab, s.infection, s.classes)  # type: ignore[attr-defined]
        for s, (lab, _) in zip(samples, preds)
    ]


def _read_predictions(folder: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    from covidtrack.segment.slices import list_images, read_gray

    files = list_images(folder)
    preds: dict[str, np.ndarray] = {}
    for n in names:
        if n not in files:
            raise InputError(folder, f"no prediction named {n}.*", "predict every image of --images or remove it")
        raw = read_gray(files[n])
        # 0/255 binary files mean "infection, type unknown": count them as GGO (label 1)
        preds[n] = np.where(raw > 127, 1, raw).astype(np.uint8) if raw.max(initial=0) > 2 else raw
    return preds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True, help="folder of JPG/PNG slices (Imgs/)")
    parser.add_argument("--masks", type=Path, help="binary infection masks 0/255 (GT/)")
    parser.add_argument("--multiclass", type=Path, help="masks 0 background, 1 GGO, 2 consolidation (GT_multiclass/)")
    parser.add_argument("--json", type=Path, help="write per-image and mean scores to this JSON file")
    parser.add_argument("--model", default=None, help="infection model version, e.g. v1 (default: the active one)")
    parser.add_argument("--predictions", type=Path, help="score these mask files instead of running a model")
    parser.add_argument("--no-tta", action="store_true", help="no left-right flip test-time augmentation")
    parser.add_argument(
        "--spine-edge",
        choices=("auto", "right", "left", "bottom"),
        default="auto",
        help="where the spine lies in the raw images (auto: from the file name; MedSeg = right)",
    )


def _fmt(v: float) -> str:
    return "   -  " if math.isnan(v) else f"{v:6.3f}"


def run(args: argparse.Namespace) -> int:
    from covidtrack.segment.slices import read_medseg_folder

    if args.masks is None and args.multiclass is None:
        raise InputError(args.images, "no reference masks given", "pass --masks GT/ and/or --multiclass GT_multiclass/")
    samples = read_medseg_folder(args.images, args.masks, args.multiclass, spine_edge=args.spine_edge)
    if args.predictions is not None:
        preds = _read_predictions(args.predictions, [s.name for s in samples])
        # prediction files are in the raw orientation; the reference masks were made canonical
        scores = [score_slice(s.name, _canonical_pred(preds[s.name], s), s.infection, s.classes) for s in samples]
        source = f"files in {args.predictions}"
    else:
        from covidtrack import modelstore
        from covidtrack.segment.infection import InfectionModel

        ref = modelstore.get("infection", args.model) if args.model else None
        model = InfectionModel.load(ref, tta=not args.no_tta)
        scores = evaluate_model_on_samples(model, samples)
        source = model.version + ("" if model.tta else " (no TTA)")
    print(f"infection scores of {source} on {len(samples)} images in {args.images}")
    print(f"{'image':>24} {'Dice':>6} {'sens':>6} {'spec':>6} {'GGO':>6} {'cons':>6}")
    for s in scores:
        print(f"{s.name:>24} {_fmt(s.dice)} {_fmt(s.sensitivity)} {_fmt(s.specificity)} {_fmt(s.dice_ggo)} {_fmt(s.dice_consolidation)}")
    summary = summarize(scores)
    means = [float("nan") if summary[m]["mean"] is None else float(summary[m]["mean"]) for m in METRICS]  # type: ignore[arg-type]
    print(f"{'mean':>24} " + " ".join(_fmt(v) for v in means))
    if args.json:
        report = {"source": source, "images": str(args.images), **scores_to_json(scores)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _canonical_pred(pred: np.ndarray, sample: object) -> np.ndarray:
    from covidtrack.segment.slices import to_canonical

    out = to_canonical(pred, sample.spine_edge)  # type: ignore[attr-defined]
    if out.shape != sample.image.shape:  # type: ignore[attr-defined]
        raise InputError(
            sample.name,  # type: ignore[attr-defined]
            f"prediction shape {pred.shape} differs from the image",
            "predict on the images as given, without cropping or resizing",
        )
    return out

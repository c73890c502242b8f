"""Simulated human-in-the-loop: does correcting the model's output make the next correction cheaper?

A scripted annotator corrects predictions to the expert truth. Setup (real data, 2D):

- the 50 expert-labelled MedSeg slices (../shared/data/covid2d/medseg_train) are split, seeded,
  into 12 held-out TEST slices, 6 INITIAL training slices and a POOL of 32 "incoming scans";
- the initial model (small MONAI UNet, 128 px) is trained on the 6 initial slices plus phantom
  slices (covidtrack.phantom, exact truth);
- each iteration, a strategy picks the next BATCH of pool slices -- ``active``: highest mean
  predictive entropy (covidtrack.hitl.active.entropy_score, over the whole cropped chest image:
  the 2D slices have no lung mask); ``random``: seeded random -- the annotator corrects them
  (effort measured), they join the training set, the model is fine-tuned from its previous
  weights (covidtrack.segment.train_infection.fit_recipe with init_weights), and it is evaluated
  on the TEST slices and the phantom validation slices of covidtrack.hitl.retrain.

Effort of correcting one slice (prediction -> truth), at the image's own resolution:

- ``pixels_share``: pixels whose label (none / GGO / consolidation) must change, divided by the
  truth's infected pixels;
- ``seconds``: a time estimate from this documented seconds-per-edit model (typical of a
  click-based editor like the Review page): 5 s to inspect the slice; 2 s per predicted lesion
  with no truth overlap (one click: delete component); 2 s per true lesion whose type is mostly
  wrong (one click: relabel); every other error region (missed lesion, missed or extra border)
  needs brush strokes of 1.5 s each, one stroke covering ``STROKE_PX`` pixels (a 6 px radius
  brush dragged 40 px), so ceil(area / STROKE_PX) strokes.

"Effort per scan" is reported on the TEST slices (what the NEXT incoming scan costs with the
current model) and on the picked batch (what the annotator actually did this iteration).

    COVIDTRACK_THREADS=1 nice -n 5 python bench/hitl_sim.py            # ~17 min on 2 shared cores
    python bench/hitl_sim.py --quick                                   # smoke run, a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import REPO_ROOT, settings  # noqa: E402
from covidtrack.hitl.active import entropy_score  # noqa: E402
from covidtrack.hitl.retrain import phantom_slices, validation_set  # noqa: E402
from covidtrack.segment.eval_slices import dice  # noqa: E402
from covidtrack.segment.infection import InfectionModel, NetSpec, save_weights  # noqa: E402
from covidtrack.segment.train_infection import TrainConfig, fit_recipe, labelled_pairs  # noqa: E402

RESULTS = REPO / "bench" / "results" / "hitl_sim.json"
FIGURE = REPO / "bench" / "figures" / "hitl_sim.png"
MEDSEG = REPO_ROOT.parent / "shared" / "data" / "covid2d" / "medseg_train"

# seconds-per-edit model (module docstring)
INSPECT_S = 5.0
CLICK_S = 2.0
STROKE_S = 1.5
STROKE_PX = 2 * 6 * 40  # brush radius 6 px dragged 40 px


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), bool))


def correction_effort(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixels to change and estimated seconds to turn ``pred`` (0/1/2) into ``truth`` (0/1/2)."""
    p_inf, t_inf = pred > 0, truth > 0
    changed = int((pred != truth).sum())
    seconds, clicks, strokes = INSPECT_S, 0, 0
    handled = np.zeros(pred.shape, bool)
    comps, n = _components(p_inf)
    for i in range(1, n + 1):  # whole false lesions: one click each
        c = comps == i
        if not (c & t_inf).any():
            clicks += 1
            handled |= c
    tcomps, tn = _components(t_inf)
    for i in range(1, tn + 1):  # true lesions found but with the wrong type: one relabel click
        c = tcomps == i
        found = c & p_inf
        if found.sum() > 0.5 * c.sum():
            wrong = int((found & (pred != truth)).sum())
            if wrong > 0.5 * found.sum():
                clicks += 1
                handled |= found & (pred != truth)
    rest = (p_inf != t_inf) & ~handled  # missed lesions and borders: brush strokes
    rcomps, rn = _components(rest)
    for i in range(1, rn + 1):
        strokes += math.ceil(int((rcomps == i).sum()) / STROKE_PX)
    seconds += CLICK_S * clicks + STROKE_S * strokes
    return {"pixels_changed": changed, "pixels_share": changed / max(1, int(t_inf.sum())), "seconds": seconds,
            "clicks": clicks, "strokes": strokes}


def split(names: list[str], seed: int, n_test: int, n_init: int) -> tuple[list[str], list[str], list[str]]:
    order = list(np.random.default_rng(seed).permutation(sorted(names, key=lambda n: (len(n), n))))
    return order[:n_test], order[n_test : n_test + n_init], order[n_test + n_init :]


def predict(model: InfectionModel, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    return model.predict_slices(images)


def evaluate(model: InfectionModel, test: list[tuple[str, np.ndarray, np.ndarray]], phantoms: list) -> dict:
    preds = predict(model, [im for _, im, _ in test])
    dices = [dice(lab > 0, truth > 0) for (_, _, truth), (lab, _) in zip(test, preds)]
    efforts = [correction_effort(lab, truth) for (_, _, truth), (lab, _) in zip(test, preds)]
    ph_preds = predict(model, [p.image for p in phantoms])
    ph_dice = [dice(lab > 0, p.classes > 0) for p, (lab, _) in zip(phantoms, ph_preds)]
    return {
        "test_dice": float(np.nanmean(dices)),
        "test_effort_share": float(np.mean([e["pixels_share"] for e in efforts])),
        "test_effort_seconds": float(np.mean([e["seconds"] for e in efforts])),
        "phantom_dice": float(np.nanmean(ph_dice)),
    }


def train(pairs: list, cfg: TrainConfig, init: Path | None, log) -> InfectionModel:
    net, _ = fit_recipe(pairs, [], replace(cfg, init_weights=init), log=log)
    return InfectionModel(net, cfg.spec, "sim", tta=True)


def run_strategy(name: str, repeat: int, start_weights: Path, start_eval: dict, pool: dict, base_pairs: list, test: list,
                 phantoms: list, cfg: TrainConfig, iterations: int, batch: int, work: Path, log) -> dict:
    """One lineage of ``iterations`` rounds. ``repeat`` seeds the random picks (random strategy)
    and the fine-tuning (both strategies: repeat k of active and of random share training seeds)."""
    seed = repeat + 1 if name == "random" else repeat
    rng = np.random.default_rng(seed)
    remaining = sorted(pool)
    labelled = list(base_pairs)
    weights = start_weights
    model = InfectionModel(*_load(weights), "sim", tta=True)
    rows = [{"iteration": 0, "added": 0, **start_eval}]
    for it in range(1, iterations + 1):
        t0 = time.time()
        preds = dict(zip(remaining, predict(model, [pool[n][0] for n in remaining])))
        if name == "active":
            scores = {n: entropy_score(preds[n][1].astype(np.float32)) for n in remaining}
            picked = sorted(remaining, key=lambda n: (-scores[n], n))[:batch]
        else:
            picked = [str(n) for n in rng.choice(remaining, size=min(batch, len(remaining)), replace=False)]
        efforts = [correction_effort(preds[n][0], pool[n][1]) for n in picked]
        labelled += [(pool[n][0], pool[n][1]) for n in picked]  # the corrected slice == the truth
        remaining = [n for n in remaining if n not in picked]
        model = train(labelled, replace(cfg, seed=cfg.seed + 1000 * repeat + it), weights, log)
        weights = work / f"{name}-{seed}-it{it}.pt"
        save_weights(model.network, cfg.spec, weights)
        ev = evaluate(model, test, phantoms)
        rows.append({
            "iteration": it, "added": len(picked), "picked": picked,
            "batch_effort_share": float(np.mean([e["pixels_share"] for e in efforts])),
            "batch_effort_seconds": float(np.mean([e["seconds"] for e in efforts])),
            **ev, "wall_s": round(time.time() - t0, 1),
        })
        log(f"[{name} seed {seed}] it {it}: test Dice {ev['test_dice']:.3f}, test effort {ev['test_effort_share']:.2f} of truth "
            f"/ {ev['test_effort_seconds']:.0f} s, batch effort {rows[-1]['batch_effort_share']:.2f} ({rows[-1]['wall_s']:.0f} s)")
    return {"strategy": name, "seed": seed, "repeat": repeat, "iterations": rows}


def _load(path: Path):
    from covidtrack.segment.infection import load_network

    return load_network(path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [("test_dice", "held-out Dice"), ("test_effort_share", "held-out effort (changed px / truth px)"),
              ("test_effort_seconds", "held-out effort (est. s / slice)"), ("batch_effort_share", "picked-batch effort (share)")]
    colors = {"active": "tab:red", "random": "tab:blue"}
    for ax, (key, title) in zip(axes, panels):
        for run in result["runs"]:
            its = [r for r in run["iterations"] if key in r]
            ax.plot([r["iteration"] for r in its], [r[key] for r in its], marker="o", color=colors[run["strategy"]],
                    alpha=0.9, linestyle="-" if run["repeat"] == 0 else "--", label=f"{run['strategy']} (repeat {run['repeat']})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("covidtrack HITL simulation: scripted annotator on real MedSeg slices (bench/hitl_sim.py)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--init-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="lineages per strategy (different fine-tuning seeds)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not written to bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.iterations, args.init_steps, args.finetune_steps, args.repeats = 1, 20, 10, 1
    if not MEDSEG.is_dir():
        print(f"{MEDSEG} not found: this bench needs the shared development data", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(settings().threads)
    t_start = time.time()

    def log(msg: str) -> None:
        if "step" in msg and not msg.rstrip().endswith("s)"):
            return
        print(msg, flush=True)

    from covidtrack.segment.slices import read_medseg_folder

    samples = {s.name: s for s in read_medseg_folder(MEDSEG / "Imgs", MEDSEG / "GT", MEDSEG / "GT_multiclass")}
    test_n, init_n, pool_n = split(list(samples), seed=0, n_test=12, n_init=6)
    pairs = dict(zip(samples, labelled_pairs(list(samples.values()))))
    test = [(n, *pairs[n]) for n in test_n]
    pool = {n: pairs[n] for n in pool_n}
    t_ph = time.time()
    train_ph = phantom_slices(seeds=(9301, 9302, 9303, 9304), per_phantom=5, size=args.size)
    val_ph = [v for v in validation_set(real_dir=None) if v.source == "phantom"]
    ph_s = time.time() - t_ph
    base_pairs = [pairs[n] for n in init_n] + [(p.image, p.classes) for p in train_ph]
    spec = NetSpec(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, input_size=args.size)
    cfg = TrainConfig(iterations=args.init_steps, student_iterations=0, batch_size=8, lr=2e-3, seed=0, spec=spec)
    work = Path(tempfile.mkdtemp(prefix="hitl-sim-", dir=settings().work_dir if settings().work_dir.exists() else None))
    try:
        t0 = time.time()
        model0 = train(base_pairs, cfg, None, log)
        init_s = time.time() - t0
        w0 = work / "initial.pt"
        save_weights(model0.network, spec, w0)
        ev0 = evaluate(model0, test, val_ph)
        print(f"initial model: test Dice {ev0['test_dice']:.3f}, effort {ev0['test_effort_share']:.2f} ({init_s:.0f} s)", flush=True)
        ft = replace(cfg, iterations=args.finetune_steps, lr=5e-4)
        runs = []
        for k in range(args.repeats):
            for strategy in ("active", "random"):
                runs.append(run_strategy(strategy, k, w0, ev0, pool, base_pairs, test, val_ph, ft, args.iterations, args.batch, work, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def series(strategy: str, key: str) -> list[float]:
        sel = [r for r in runs if r["strategy"] == strategy]
        return [float(np.mean([r["iterations"][i][key] for r in sel])) for i in range(args.iterations + 1)]

    summary = {s: {k: [round(v, 4) for v in series(s, k)] for k in ("test_dice", "test_effort_share", "test_effort_seconds", "phantom_dice")}
               for s in ("active", "random")}
    act, rnd = summary["active"]["test_effort_share"], summary["random"]["test_effort_share"]
    per_repeat = {s: [[round(x["test_effort_share"], 4) for x in r["iterations"]] for r in runs if r["strategy"] == s] for s in ("active", "random")}
    verdict = {
        "effort_falls_every_iteration_per_repeat": {s: [all(b < a for a, b in zip(v, v[1:])) for v in vs] for s, vs in per_repeat.items()},
        "active_effort_falls_every_iteration": all(b < a for a, b in zip(act, act[1:])),
        "random_effort_falls_every_iteration": all(b < a for a, b in zip(rnd, rnd[1:])),
        "active_beats_random_final_effort": act[-1] < rnd[-1],
        "active_beats_random_final_dice": summary["active"]["test_dice"][-1] > summary["random"]["test_dice"][-1],
    }
    result = {
        "what": "simulated HITL loop: scripted annotator corrects predictions to the expert truth; effort and Dice per "
        "iteration for active (entropy) vs random batch selection",
        "data": {
            "source": "MedSeg COVID-19 CT segmentation slices (Radiopaedia/SIRM) via DengPingFan/Inf-Net @ c17e524 "
            "Dataset/TrainingSet (../shared/data/covid2d/medseg_train), non-commercial licence; phantom slices from covidtrack.phantom",
            "split_seed": 0, "test": test_n, "initial": init_n, "pool": pool_n,
            "phantom_train_slices": len(train_ph), "phantom_validation_slices": len(val_ph),
        },
        "model": {"kind": "MONAI UNet 2D trained inside the bench (not a shipped version)", **spec.to_json(),
                  "initial_steps": args.init_steps, "finetune_steps": args.finetune_steps, "batch_size": 8,
                  "lr_initial": 2e-3, "lr_finetune": 5e-4, "augmentation": "train_infection.augment (geometry + re-windowing)"},
        "protocol": {"iterations": args.iterations, "batch": args.batch, "repeats_per_strategy": args.repeats,
                     "active_score": "mean binary entropy (bits) of P(infection) over the slice",
                     "effort_model": {"inspect_s_per_slice": INSPECT_S, "click_s": CLICK_S, "stroke_s": STROKE_S,
                                      "stroke_px": STROKE_PX, "doc": "see module docstring of bench/hitl_sim.py"}},
        "summary_mean_over_runs": summary,
        "verdict": verdict,
        "runs": runs,
        "timing_s": {"phantoms": round(ph_s, 1), "initial_training": round(init_s, 1), "total": round(time.time() - t_start, 1)},
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "threads": settings().threads, "note": "2 CPU cores shared by ~8 engineers; timings are noisy"},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps({"summary": summary, "verdict": verdict}, indent=1))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, FIGURE)
        print(f"wrote {RESULTS} and {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

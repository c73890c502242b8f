"""``python -m covidtrack train lungs``: seeded, reproducible training of a lung model version.

Training data (all on the model grid, see :mod:`covidtrack.segment.lungs`):

- the real chest CTs beside the repository (``../shared/data/ct``) with targets from the
  classical extraction (:mod:`covidtrack.segment.lung_targets`), inspected by eye;
- phantoms with exact truth (:func:`covidtrack.phantom.make_phantom`) when that module exists;
- on the real CTs, dense consolidations and effusion-like opacities inserted at the pleura (and
  ground-glass blobs anywhere in the lung) while the target stays the full lung, so the network
  learns to include exactly what threshold masks leave out.

Augmentation: random rotation / scale / translation (crop), left-right mirror with the labels
swapped, HU scale and offset, noise and blur. Loss: Dice + cross-entropy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidtrack.config import REPO_ROOT, settings
from covidtrack.errors import InputError
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG

REAL_CASES = ("chest4dct_phase00", "lung-pet-ct-dx_A0001", "cip_copdgene_ct64")
REAL_LICENCES = {
    "chest4dct_phase00": "Apache-2.0 (ITKElastix example data)",
    "lung-pet-ct-dx_A0001": "CC BY 4.0 (TCIA Lung-PET-CT-Dx)",
    "cip_copdgene_ct64": "CIP licence, BSD-style (ChestImagingPlatform test data)",
}
PATCH = (24, 112, 112)  # model voxels: 96 x 336 x 336 mm at (4, 3, 3) mm, most of a chest in-plane


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=1500, help="optimiser steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--phantoms", type=int, default=8, help="training phantoms (if covidtrack.phantom is installed)")
    parser.add_argument("--val-phantoms", type=int, default=3, help="held-out phantoms for the card's metrics")
    parser.add_argument("--version", default=None, help="version name (default: next free vN)")
    parser.add_argument("--out", type=Path, default=None, help="version folder (default: $COVIDTRACK_HOME/models/lungs/<version>)")
    parser.add_argument("--data", type=Path, default=None, help="folder with the real CTs (default: ../shared/data/ct)")
    parser.add_argument("--init", type=Path, default=None, help="weights.pt to fine-tune from")
    parser.add_argument("--checkpoint", type=Path, default=None, help="also save weights here every 100 steps")


@dataclass
class Case:
    """One training volume on the model grid."""

    name: str
    hu: np.ndarray  # float32 HU, (z, y, x)
    target: np.ndarray  # uint8 0 / 1 right / 2 left
    pleura_mm: np.ndarray  # float32 distance (mm) inside the lung to its border, 0 outside
    real: bool
    lung_idx: np.ndarray  # (n, 3) voxel indices of the lung, precomputed: sampling runs per step
    pleural_idx: np.ndarray  # (n, 3) lung voxels within 8 mm of the pleura


def _to_model_grid(hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], spec) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from covidtrack.segment.lungs import model_grid_shape, resample

    size = model_grid_shape(hu.shape, spacing, spec)
    x = resample(torch.from_numpy(hu.astype(np.float32))[None, None], size, spacing, spec.spacing_mm)[0, 0].numpy()
    onehot = torch.from_numpy(np.stack([labels == k for k in range(3)]).astype(np.float32))[None]
    y = resample(onehot, size, spacing, spec.spacing_mm)[0].argmax(0).numpy().astype(np.uint8)
    return x, y


def _case(name: str, hu: np.ndarray, labels: np.ndarray, spacing, spec, real: bool) -> Case:
    x, y = _to_model_grid(hu, labels, spacing, spec)
    dist = ndi.distance_transform_edt(y > 0, sampling=spec.spacing_mm).astype(np.float32)
    return Case(name=name, hu=x, target=y, pleura_mm=dist, real=real, lung_idx=np.argwhere(y > 0),
                pleural_idx=np.argwhere((dist > 0) & (dist < 8.0)))


def load_real_cases(root: Path, spec, log) -> tuple[list[Case], dict]:
    from covidtrack.segment.lung_targets import extract_lungs, read_training_ct

    cases, reports = [], {}
    for name in REAL_CASES:
        folder = root / name / "dicom"
        if not folder.is_dir():
            raise InputError(folder, "training CT folder missing", "pass --data pointing at the shared data/ct folder")
        vol = read_training_ct(folder)
        labels, rep = extract_lungs(vol)
        reports[name] = {"shape": list(vol.shape), "spacing_mm": list(vol.spacing), "right_ml": round(rep.right_ml, 1),
                         "left_ml": round(rep.left_ml, 1), "airway_threshold_hu": rep.airway_threshold_hu, "split": rep.split}
        log(f"real {name}: {vol.shape} target R {rep.right_ml:.0f} mL L {rep.left_ml:.0f} mL ({rep.split})")
        cases.append(_case(name, vol.array, labels, vol.spacing, spec, real=True))
    return cases, reports


def make_phantom_cases(seeds: list[int], spec, log) -> list[Case]:
    """Phantoms with exact lung truth, when :mod:`covidtrack.phantom` provides ``make_phantom``."""
    try:
        from covidtrack.phantom import make_phantom  # type: ignore[attr-defined]
    except ImportError:
        log("phantoms: covidtrack.phantom.make_phantom not available, training without them")
        return []
    cases = []
    for seed in seeds:
        vol, truth = make_phantom(seed)
        cases.append(_case(f"phantom-{seed}", vol.array, truth.lungs, vol.spacing, spec, real=False))
    log(f"phantoms: {len(cases)} (seeds {seeds[0]}..{seeds[-1]})" if cases else "phantoms: none")
    return cases


# --- augmentation ---------------------------------------------------------------------------------
def insert_opacities(hu: np.ndarray, case: Case, rng: np.random.Generator, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Paint dense consolidation / effusion-like crescents at the pleura and GGO blobs in the lung.

    The target is left unchanged: everything painted lies inside the lung, which is what the
    network must learn (HU thresholds cut these regions out of the lung).
    """
    lung = case.target > 0
    pleural = case.pleural_idx
    if len(pleural) == 0:
        return hu
    sp = np.asarray(spacing_mm, dtype=np.float32)
    out = hu.copy()
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["consolidation", "effusion", "ggo"], p=[0.45, 0.35, 0.2])
        if kind == "effusion":
            # dependent (posterior) pleura: effusions layer at the back of a supine patient
            post = pleural[pleural[:, 1] > np.percentile(pleural[:, 1], 60)]
            centre = post[rng.integers(len(post))] if len(post) else pleural[rng.integers(len(pleural))]
            radii = rng.uniform([30, 30, 30], [80, 60, 60])
        elif kind == "consolidation":
            centre = pleural[rng.integers(len(pleural))]
            radii = rng.uniform(8, 35, size=3)
        else:
            centre = case.lung_idx[rng.integers(len(case.lung_idx))]
            radii = rng.uniform(8, 30, size=3)
        # work in the ellipsoid's bounding box (+2 voxels for the soft edge) only
        half = np.ceil(radii / sp).astype(int) + 2
        box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, hu.shape))
        grids = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
        d2 = sum(((g - c) * s_ / r) ** 2 for g, c, s_, r in zip(grids, centre, sp, radii))
        region = lung[box] & (d2 <= 1.0)
        if kind == "effusion":
            region &= case.pleura_mm[box] < rng.uniform(6.0, 25.0)  # a crescent along the pleura
        if not region.any():
            continue
        value = {"consolidation": rng.uniform(-80, 60), "effusion": rng.uniform(0, 35), "ggo": rng.uniform(-650, -350)}[kind]
        w = ndi.gaussian_filter(region.astype(np.float32), 0.7)  # partial-volume edge
        w = np.where(lung[box], w, 0.0)
        texture = value + rng.normal(0, 15, size=w.shape).astype(np.float32)
        out[box] = out[box] * (1 - w) + texture * w
    return out.astype(np.float32)


def sample_patch(case: Case, rng: np.random.Generator, spec) -> tuple[np.ndarray, np.ndarray]:
    """Random affine crop of ``PATCH`` model voxels: HU (float32) and labels (int64)."""
    import torch
    import torch.nn.functional as F

    hu = insert_opacities(case.hu, case, rng, spec.spacing_mm) if case.real and rng.random() < 0.7 else case.hu
    shape = np.asarray(case.hu.shape, dtype=np.float64)
    sp = np.asarray(spec.spacing_mm)
    # centre: somewhere in the lungs' bounding box, so most patches contain lung
    lo, hi = case.lung_idx.min(0), case.lung_idx.max(0)
    centre = rng.uniform(lo, hi + 1)
    # rotation (mostly about z: patients lie rotated on the table), anisotropic scale
    az, ay, ax = np.deg2rad(rng.uniform([-15, -6, -6], [15, 6, 6]))
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])
    ry = np.array([[np.cos(ay), 0, -np.sin(ay)], [0, 1, 0], [np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])
    scale = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3)
    mat = rz @ ry @ rx @ np.diag(scale)
    offs = [np.arange(n) - (n - 1) / 2 for n in PATCH]
    grid_mm = np.stack(np.meshgrid(*offs, indexing="ij"), -1) * sp  # (pz, py, px, 3) mm in the patch
    src = (grid_mm @ mat.T) / sp + centre  # source voxel indices
    # only the source box the patch touches is converted and sampled (the volume is ~8x bigger)
    lo = np.clip(np.floor(src.reshape(-1, 3).min(0)).astype(int) - 1, 0, shape.astype(int) - 1)
    hi = np.clip(np.ceil(src.reshape(-1, 3).max(0)).astype(int) + 2, lo + 1, shape.astype(int))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    src = src - lo
    norm = 2.0 * (src + 0.5) / (hi - lo) - 1.0  # align_corners=False
    grid = torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]
    pad_hu = -1024.0
    target = case.target[box]
    vol = torch.from_numpy(np.stack([hu[box] - pad_hu, target == 1, target == 2]).astype(np.float32))[None]
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].numpy()
    x = out[0] + pad_hu  # outside the scan reads as air, like a small field of view
    fg = np.stack([1.0 - out[1] - out[2], out[1], out[2]])
    y = fg.argmax(0)
    if rng.random() < 0.5:  # mirror left-right; the right lung is by definition the low-x one
        x = x[..., ::-1]
        y = y[..., ::-1]
        y = np.where(y > 0, 3 - y, 0)
    # intensity: scanner calibration, reconstruction kernel, noise
    x = x * rng.uniform(0.92, 1.08) + rng.uniform(-50, 50)
    if rng.random() < 0.4:
        x = ndi.gaussian_filter(x, rng.uniform(0.3, 1.0))
    x = x + rng.normal(0, rng.uniform(0, 40), size=x.shape)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)


# --- training -------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def run(args: argparse.Namespace) -> int:
    import torch
    from monai.losses import DiceCELoss

    from covidtrack import modelstore
    from covidtrack.segment.lungs import LungNetSpec, build_network, load_network, normalise_hu, save_weights

    t0 = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(settings().threads)
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731

    version = modelstore.check_new_version("lungs", args.version) if args.version else modelstore.next_version("lungs")
    out = args.out or settings().models_dir / "lungs" / version
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "version folder exists and is not empty (versions are immutable)", "pick another --version or --out")
    spec = LungNetSpec()
    data_root = args.data or REPO_ROOT.parent / "shared" / "data" / "ct"

    real, target_reports = load_real_cases(data_root, spec, log)
    phantom_seeds = list(range(1000 + args.seed * 100, 1000 + args.seed * 100 + args.phantoms))
    phantoms = make_phantom_cases(phantom_seeds, spec, log) if args.phantoms else []
    cases = real + phantoms

    if args.init:
        net, spec = load_network(args.init)
        net.train()
    else:
        net = build_network(spec)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iterations, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    running = []
    for it in range(1, args.iterations + 1):
        # real CTs are few but carry the texture of real scans: half the draws
        case = real[int(rng.integers(len(real)))] if (not phantoms or rng.random() < 0.6) else phantoms[int(rng.integers(len(phantoms)))]
        x, y = sample_patch(case, rng, spec)
        xt = torch.from_numpy(normalise_hu(x))[None, None]
        yt = torch.from_numpy(y)[None, None]
        loss = loss_fn(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if it % 25 == 0:
            log(f"step {it}/{args.iterations} loss {np.mean(running[-25:]):.4f}")
        if args.checkpoint and it % 100 == 0:
            save_weights(net, spec, args.checkpoint)
    train_s = time.time() - t0
    net.eval()

    save_weights(net, spec, out / "weights.pt")
    return finish_version(net, spec, out, version, args, train_s, target_reports, phantom_seeds if phantoms else [], log)


def finish_version(net, spec, out: Path, version: str, args: argparse.Namespace, train_s: float, target_reports: dict,
                   phantom_seeds: list[int], log) -> int:
    """Validate saved weights and write ``card.json`` + ``MODEL_CARD.md`` into the version folder."""
    from covidtrack.segment.lungs import sha256_of, write_card

    sha = sha256_of(out / "weights.pt")
    metrics, reports = validate(net, spec, args, log)
    target_reports = target_reports or reports
    card = {
        "task": "lungs",
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_commit": _git_commit(),
        "weights_sha256": sha,
        "network": {"arch": "MONAI UNet 3D", **spec.to_json()},
        "input": {"hu_window": [-1024, 600], "grid": "resampled to spacing_mm, probabilities mapped back trilinear"},
        "training": {
            "seed": args.seed,
            "iterations": args.iterations,
            "patch_model_voxels": list(PATCH),
            "batch_size": 1,
            "optimiser": f"AdamW one-cycle max lr {args.lr}",
            "loss": "Dice + cross-entropy",
            "augmentation": "rotation (z +-15 deg, x/y +-6 deg), scale 0.85-1.15, random crop, left-right mirror with label swap, "
                            "HU x0.92-1.08 +-50, Gaussian blur, noise 0-40 HU; inserted consolidation / effusion-like crescents at the "
                            "pleura and GGO blobs on real CTs (target keeps the full lung)",
            "init": str(args.init) if args.init else None,
            "wall_time_s": round(train_s, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (2 CPU cores, shared)",
        },
        "data": {
            "real_ct": {name: {"licence": REAL_LICENCES[name], "target": "classical extraction (lung_targets.py), inspected by eye", **rep}
                        for name, rep in target_reports.items()},
            "phantoms": {"seeds": phantom_seeds, "licence": "synthetic (covidtrack.phantom)"},
            "split": "all three real CTs are used for training (no expert masks exist); held-out phantoms for validation",
        },
        "validation": metrics,
    }
    write_card(out, card)
    (out / "MODEL_CARD.md").write_text(model_card_md(card))
    log(f"wrote {out} ({(out / 'weights.pt').stat().st_size / 1e6:.2f} MB)")
    print(json.dumps(metrics, indent=2))
    return 0


def validate(net, spec, args: argparse.Namespace, log) -> tuple[dict, dict]:
    """Dice on held-out phantoms (exact truth) and agreement with the classical targets (training CTs).

    Returns ``(metrics, target_reports)``; the reports describe the classical targets (volumes, split)."""
    from covidtrack.segment.lungs import LungModel

    model = LungModel(net, spec, "candidate")
    out: dict = {"real_ct_agreement_with_training_target": {}, "held_out_phantoms": {}}
    reports: dict = {}
    from covidtrack.segment.lung_targets import extract_lungs, read_training_ct

    data_root = args.data or REPO_ROOT.parent / "shared" / "data" / "ct"
    for name in REAL_CASES:
        vol = read_training_ct(data_root / name / "dicom")
        ref, rep = extract_lungs(vol)
        reports[name] = {"shape": list(vol.shape), "spacing_mm": list(vol.spacing), "right_ml": round(rep.right_ml, 1),
                         "left_ml": round(rep.left_ml, 1), "airway_threshold_hu": rep.airway_threshold_hu, "split": rep.split}
        pred = model.predict(vol)
        d = {side: round(dice(pred == lab, ref == lab), 4) for side, lab in (("right", RIGHT_LUNG), ("left", LEFT_LUNG))}
        d["lung"] = round(dice(pred > 0, ref > 0), 4)
        out["real_ct_agreement_with_training_target"][name] = d
        log(f"val {name}: {d}")
    try:
        from covidtrack.phantom import make_phantom  # type: ignore[attr-defined]
    except ImportError:
        make_phantom = None
    if make_phantom is not None:
        for seed in range(500, 500 + args.val_phantoms):
            vol, truth = make_phantom(seed)
            pred = model.predict(vol)
            d = {"lung": round(dice(pred > 0, truth.lungs > 0), 4),
                 "right": round(dice(pred == RIGHT_LUNG, truth.lungs == RIGHT_LUNG), 4),
                 "left": round(dice(pred == LEFT_LUNG, truth.lungs == LEFT_LUNG), 4)}
            out["held_out_phantoms"][f"seed-{seed}"] = d
            log(f"val phantom {seed}: {d}")
    return out, reports


def model_card_md(card: dict) -> str:
    t, d, v = card["training"], card["data"], card["validation"]
    lines = [
        f"# Lung model {card['task']}/{card['version']}",
        "",
        "3D MONAI UNet on a coarse grid labelling right (1) and left (2) lung; probabilities are mapped back",
        "to the scan grid and post-processed (largest component per side, fragment reassignment, side check by",
        "position, hole filling).",
        "",
        f"- Created {card['created']} from code commit `{card['code_commit']}`; weights sha256 `{card['weights_sha256'][:16]}...`",
        f"- Network: channels {card['network']['channels']}, strides {card['network']['strides']}, "
        f"{card['network']['num_res_units']} residual unit(s), model grid {card['network']['spacing_mm']} mm (z, y, x)",
        f"- Training: {t['iterations']} steps, batch 1, patch {t['patch_model_voxels']} model voxels, {t['optimiser']}, {t['loss']}, seed {t['seed']}",
        f"- Wall time {t['wall_time_s'] / 60:.1f} min on {t['hardware']}",
        f"- Augmentation: {t['augmentation']}",
        "",
        "## Data and licences",
        "",
    ]
    for name, rep in d["real_ct"].items():
        lines.append(f"- real CT `{name}` ({rep['licence']}): target = {rep['target']}; R {rep['right_ml']} mL, L {rep['left_ml']} mL")
    lines += [
        f"- phantoms: seeds {d['phantoms']['seeds']} ({d['phantoms']['licence']})",
        f"- split: {d['split']}",
        "",
        "## Validation",
        "",
        "Agreement with the classical targets on the training CTs (NOT independent; it shows the network",
        "reproduces the targets, and differs where it includes dense opacity that thresholds leave out):",
        "",
    ]
    for name, m in v["real_ct_agreement_with_training_target"].items():
        lines.append(f"- `{name}`: {m}")
    lines += ["", "Held-out phantoms (exact truth):", ""]
    lines += [f"- {k}: {m}" for k, m in v["held_out_phantoms"].items()] or ["- none (phantom module absent at training time)"]
    lines += ["", "Known weaknesses: only three real CTs (none with COVID-19 opacities); real targets are automatic, not expert.", ""]
    return "\n".join(lines)

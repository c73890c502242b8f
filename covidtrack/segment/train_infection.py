"""``python -m covidtrack train infection``: seeded training of a 2D infection model version.

Recipe (see README.d/infection.md for the measured effect of each part):

1. Teacher: the MONAI UNet of :mod:`covidtrack.segment.infection` trained on the labelled slices
   (+ ``extra`` samples, e.g. human corrections) with DiceCE plus a soft Dice on the union
   GGO + consolidation (the clinical quantity), strong geometric augmentation (rotation, scale,
   shift, left-right flip, elastic) and intensity augmentation (random re-windowing, gamma,
   noise), so 8-bit exports and HU volumes with other windows look alike to the network.
2. Self-training (optional): the teacher labels the unlabelled slices (with flip TTA); a
   student starts from the teacher's weights and trains on labelled + pseudo-labelled slices,
   half of each batch real. The real slices are never replaced.

:func:`train` is the library entry point (the HITL fine-tuning reuses it with ``extra`` samples
and ``init_weights``); :func:`fit_recipe` trains in memory (used by the cross-validation bench).
torch is imported inside functions so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidtrack.config import REPO_ROOT, settings
from covidtrack.segment.infection import NetSpec

if TYPE_CHECKING:
    import torch

    from covidtrack.modelstore import ModelRef
    from covidtrack.segment.slices import SliceSample

Log = Callable[[str], None]
#: Where the development data live beside the repository (training code only, never at run time).
SHARED_COVID2D = REPO_ROOT.parent / "shared" / "data" / "covid2d"

LICENCE_NOTE = (
    "Trained on MedSeg COVID-19 CT segmentation slices (Radiopaedia/SIRM, via Inf-Net) and "
    "COVID-19-CT-Seg slices: licensed for NON-COMMERCIAL use only. The model inherits that limit."
)


@dataclass(frozen=True, eq=False)
class TrainConfig:
    """Everything a training run depends on (recorded in the model card).

    Folders follow the MedSeg layout (see :mod:`covidtrack.segment.slices`). ``extra`` holds
    additional labelled samples as ``(unit image in [0, 1], classes 0/1/2)`` pairs in canonical
    orientation (e.g. corrected axial CT slices windowed with
    :func:`covidtrack.segment.intensity.window_hu`). ``exclude`` names labelled slices held out
    for validation: they are scored after training and reported in the card.
    ``auxiliary`` holds synthetic or healthy samples in the same form (healthy-lung negatives,
    phantom slices with their true lesions): they fill ``aux_fraction`` of every batch, so the
    real labelled slices keep the majority of each batch however many auxiliary samples exist.
    ``iterations`` / ``student_iterations`` count optimiser steps of ``batch_size`` slices;
    ``student_iterations = 0`` (or no ``unlabeled``) disables self-training.
    """

    images: Path | None = None
    masks: Path | None = None
    multiclass: Path | None = None
    unlabeled: Path | None = None
    unlabeled_stride: int = 4
    extra: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    auxiliary: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    aux_fraction: float = 0.25
    aux_sources: str = ""  # what the auxiliary samples are (recorded in the card)
    init_weights: Path | None = None
    exclude: tuple[str, ...] = ()
    iterations: int = 300
    student_iterations: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    intensity_aug: float = 1.0  # strength of the re-windowing / gamma / noise augmentation (1 = v1 recipe)
    seed: int = 0
    spec: NetSpec = field(default_factory=NetSpec)
    out_root: Path | None = None  # None: $COVIDTRACK_HOME/models
    version: str | None = None  # None: next free version number
    validation: dict | None = None  # e.g. cross-validation results to copy into the card
    notes: str = ""
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when available); inference stays on CPU


@dataclass(frozen=True)
class TrainResult:
    ref: "ModelRef"
    wall_s: float
    holdout: dict | None  # summary of the held-out slices (None without ``exclude``)


# --- data ------------------------------------------------------------------------------------
def to_network_grid(unit: np.ndarray, classes: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A canonical 2D slice (and its labels) -> the square ``size`` x ``size`` grid the network sees.

    Same geometry as :meth:`InfectionModel.predict_slices` (the whole image padded to a square),
    bilinear for the image and nearest for labels.
    """
    import torch

    from covidtrack.segment.infection import SquareView, resample_to_view

    view = SquareView.whole_image(unit.shape)
    img = resample_to_view(torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None], view, size)
    lab = None
    if classes is not None:
        t = torch.from_numpy(np.ascontiguousarray(classes, dtype=np.float32))[None, None]
        lab = resample_to_view(t, view, size, mode="nearest")[0, 0].numpy().astype(np.uint8)
    return img[0, 0].numpy(), lab


def stack_samples(pairs: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(unit, classes)`` pairs -> images (N, 1, S, S) float32 and labels (N, 1, S, S) int64."""
    import torch

    ims, labs = [], []
    for unit, classes in pairs:
        im, lab = to_network_grid(unit, classes, size)
        ims.append(im)
        labs.append(lab)
    return torch.from_numpy(np.stack(ims))[:, None], torch.from_numpy(np.stack(labs).astype(np.int64))[:, None]


def lung_slices(
    hu: np.ndarray, lungs: np.ndarray, spacing: Sequence[float], stride: int = 2, classes: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training examples from a HU volume: every ``stride``-th axial slice through the lungs,
    windowed and cropped to the field of view inference uses (lung box + margin), with
    ``classes`` (0/1/2, zeroed outside the lungs) as labels, or label 0 everywhere when None.
    """
    from covidtrack.segment.infection import SquareView
    from covidtrack.segment.intensity import window_hu

    inside = lungs > 0
    zs = np.nonzero(inside.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return []
    sy, sx = float(spacing[1]), float(spacing[2])
    view = SquareView.around_mask(inside[zs], (sy, sx))
    y0, y1, x0, x1 = view.box()
    out = []
    for z in zs[::stride]:
        crop = window_hu(hu[z, y0:y1, x0:x1])
        lab = np.zeros(crop.shape, np.uint8) if classes is None else np.where(inside[z], classes[z], 0)[y0:y1, x0:x1].astype(np.uint8)
        if abs(sy - sx) > 1e-3:  # square in mm -> resample the box so that its pixels are square
            from scipy.ndimage import zoom

            factors = (sy / min(sy, sx), sx / min(sy, sx))
            crop, lab = zoom(crop, factors, order=1), zoom(lab, factors, order=0)
        out.append((crop.astype(np.float32), lab))
    return out


def negative_slices(hu: np.ndarray, lungs: np.ndarray, spacing: Sequence[float], stride: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Healthy-lung examples (label 0 everywhere), see :func:`lung_slices`.

    They teach the network that aerated lung with vessels is not GGO; the 2D training slices are
    all from COVID-19 patients.
    """
    return lung_slices(hu, lungs, spacing, stride)


def negatives_from_files(paths: Sequence[Path], stride: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`negative_slices` of CT files/folders, lungs from the classical extraction (training only)."""
    from covidtrack.io import load_ct
    from covidtrack.segment.lung_targets import extract_lungs

    out: list[tuple[np.ndarray, np.ndarray]] = []
    for p in paths:
        vol = load_ct(p)
        lungs, _ = extract_lungs(vol)
        out += negative_slices(vol.array, lungs, vol.spacing, stride)
    return out


def negatives_from_phantoms(n: int, stride: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`negative_slices` of ``n`` healthy phantoms (seeds 1000..)."""
    return phantom_slices(range(1000, 1000 + n), stride, healthy=True)


def phantom_slices(seeds: Sequence[int], stride: int = 2, healthy: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lung slices of phantoms with their true GGO/consolidation labels (``healthy``: label 0).

    Cropped like :func:`negative_slices` (the field of view inference uses on volumes). Sick
    phantoms teach what a lesion looks like on a HU volume windowed by the product, next to the
    8-bit exports of the real slices; they are auxiliary data and never replace the real slices.
    """
    from covidtrack.phantom import make_phantom

    out: list[tuple[np.ndarray, np.ndarray]] = []
    for seed in seeds:
        vol, truth = make_phantom(int(seed), (60, 128, 128), (5.0, 2.7, 2.7), healthy=healthy)
        out += lung_slices(vol.array, truth.lungs, vol.spacing, stride, classes=None if healthy else truth.infection)
    return out


def save_pairs(path: Path, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write ``(unit image, classes)`` pairs of any sizes to one ``.npz`` (e.g. auxiliary data
    prepared where the CT files are, for training on another machine)."""
    arrays = {}
    for i, (im, lab) in enumerate(pairs):
        arrays[f"im{i:05d}"] = np.asarray(im, np.float16)
        arrays[f"lab{i:05d}"] = np.asarray(lab, np.uint8)
    np.savez_compressed(path, **arrays)


def load_pairs(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs written by :func:`save_pairs` (images back to float32)."""
    with np.load(path) as z:
        keys = sorted(k for k in z.files if k.startswith("im"))
        return [(z[k].astype(np.float32), z["lab" + k[2:]]) for k in keys]


def labelled_pairs(samples: Sequence["SliceSample"]) -> list[tuple[np.ndarray, np.ndarray]]:
    """SliceSamples with masks -> ``(unit, classes)``; binary-only samples count as GGO."""
    from covidtrack.segment.intensity import unit_from_uint8

    pairs = []
    for s in samples:
        classes = s.classes if s.classes is not None else s.infection
        if classes is None:
            raise ValueError(f"{s.name}: sample has no mask")
        pairs.append((unit_from_uint8(s.image), classes.astype(np.uint8)))
    return pairs


# --- augmentation ----------------------------------------------------------------------------
def augment(
    images: "torch.Tensor", labels: "torch.Tensor", gen: "torch.Generator", intensity: float = 1.0
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Random geometry (rotation +-15 deg, scale 0.8-1.25, shift +-8 %, left-right flip, elastic)
    and intensity (re-windowing, gamma, noise) on a batch, batched in torch for CPU speed.

    ``intensity`` scales the intensity ranges (log-ranges of window scale and gamma, offset, noise):
    1.0 is the v1 recipe; strong re-windowing can make normal lung look like GGO of another image.
    """
    import math

    import torch
    import torch.nn.functional as F

    b, _, s, _ = images.shape
    dev = images.device  # ``gen`` lives on the same device

    def uniform(lo: float, hi: float, n: int = b) -> "torch.Tensor":
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=dev)

    angle = uniform(-15, 15) * math.pi / 180
    zoom = torch.exp(uniform(math.log(0.8), math.log(1.25)))
    flip = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    # elastic: a smooth random displacement (5x5 control points, up to ~3 % of the field of view)
    disp = torch.randn(b, 2, 5, 5, generator=gen, device=dev) * 0.03 * (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < 0.7)
    grid = grid + F.interpolate(disp, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    img = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    # intensity: another exporter's window = affine map of the unit image (see intensity.rewindow)
    k = float(intensity)
    scale = torch.exp(uniform(k * math.log(0.55), k * math.log(1.35)))[:, None, None, None]
    offset = uniform(-0.12 * k, 0.12 * k)[:, None, None, None]
    gamma = torch.exp(uniform(k * math.log(0.7), k * math.log(1.5)))[:, None, None, None]
    img = (img * scale + offset).clamp(0, 1) ** gamma
    img = img + torch.randn(img.shape, generator=gen, device=dev) * uniform(0, 0.03 * k)[:, None, None, None]
    return img.clamp(0, 1), lab


# --- loss ------------------------------------------------------------------------------------
def make_loss() -> Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]:
    """DiceCE over the 3 classes + soft Dice of the union GGO + consolidation (the infection mask)."""
    import torch
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def loss(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        probs = torch.softmax(logits, dim=1)
        p_inf = probs[:, 1] + probs[:, 2]
        t_inf = (target[:, 0] > 0).float()
        union_dice = 1 - (2 * (p_inf * t_inf).sum() + 1) / (p_inf.sum() + t_inf.sum() + 1)
        return dice_ce(logits, target) + union_dice

    return loss


# --- training loops --------------------------------------------------------------------------
def resolve_device(name: str) -> "torch.device":
    """``"auto"`` -> cuda when available, else cpu; anything else as torch spells it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


Source = tuple["torch.Tensor", "torch.Tensor"]


def batch_counts(batch_size: int, shares: Sequence[float]) -> list[int]:
    """Slices per source in one batch: ``shares`` of the batch (the first source, the real
    labelled slices, gets the rest and at least one slice)."""
    counts = [0] + [int(round(batch_size * f)) for f in shares[1:]]
    counts[0] = batch_size - sum(counts)
    if counts[0] < 1:
        raise ValueError(f"batch of {batch_size} leaves no room for real slices with shares {list(shares)}")
    return counts


def _fit(
    net: "torch.nn.Module",
    sources: Sequence[tuple[Source, float]],
    iterations: int,
    cfg: TrainConfig,
    gen: "torch.Generator",
    log: Log,
    tag: str,
) -> list[float]:
    """AdamW with warm-up and cosine decay. Each batch mixes ``sources`` ((images, labels), share):
    the first is the real labelled slices and takes what the other shares leave."""
    import torch

    dev = next(net.parameters()).device
    counts = batch_counts(cfg.batch_size, [f for _, f in sources])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = max(1, iterations // 20)

    def lr_factor(step: int) -> float:  # linear warm-up over 5 %, then cosine decay to 2 %
        if step < warm:
            return (step + 1) / warm
        return 0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, iterations - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = make_loss()
    net.train()
    history: list[float] = []
    t0 = time.time()
    for it in range(iterations):
        xs, ys = [], []
        for ((images, labels), _), n in zip(sources, counts):
            if n:
                idx = torch.randint(0, images.shape[0], (n,), generator=gen, device=dev)
                xs.append(images[idx])
                ys.append(labels[idx])
        x, y = augment(torch.cat(xs), torch.cat(ys), gen, cfg.intensity_aug)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.detach())
        if (it + 1) % 50 == 0 or it + 1 == iterations:
            history[-50:] = [float(h) for h in history[-50:]]
            log(f"[{tag}] step {it + 1}/{iterations} loss {np.mean(history[-50:]):.4f} ({time.time() - t0:.1f} s)")
    net.eval()
    return [float(h) for h in history]


def pseudo_label(net: "torch.nn.Module", images: "torch.Tensor", batch: int = 16) -> "torch.Tensor":
    """Teacher labels (N, 1, S, S) int64 for unit images (N, 1, S, S), with flip TTA (on the net's device)."""
    import torch

    from covidtrack.segment.infection import labels_from_probs

    dev = next(net.parameters()).device
    out = []
    net.eval()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch].to(dev)
            p = torch.softmax(net(x), 1)
            p = 0.5 * (p + torch.flip(torch.softmax(net(torch.flip(x, dims=(3,))), 1), dims=(3,)))
            lab, _ = labels_from_probs(p.cpu().numpy().transpose(1, 0, 2, 3))
            out.append(torch.from_numpy(lab.astype(np.int64))[:, None])
    return torch.cat(out)


def fit_recipe(
    labelled: Sequence[tuple[np.ndarray, np.ndarray]],
    unlabeled: Sequence[np.ndarray],
    cfg: TrainConfig,
    log: Log = print,
    on_teacher: Callable[["torch.nn.Module"], None] | None = None,
) -> tuple["torch.nn.Module", dict]:
    """Train teacher (and student when ``unlabeled`` and ``cfg.student_iterations``) in memory.

    ``cfg.auxiliary`` fills ``cfg.aux_fraction`` of each batch. Training runs on ``cfg.device``;
    the returned network (eval mode) is on the CPU, with a dict of what happened (losses,
    counts, seconds). ``on_teacher`` sees the teacher on the training device.
    """
    import torch

    from covidtrack.segment.infection import build_network, load_network

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dev = resolve_device(cfg.device)
    if dev.type == "cuda":  # TF32 convolutions and autotuned kernels: same recipe, faster steps
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    torch.set_num_threads(settings().threads)
    size = cfg.spec.input_size
    real = tuple(t.to(dev) for t in stack_samples(labelled, size))
    sources: list[tuple[Source, float]] = [(real, 1.0)]  # type: ignore[list-item]
    if cfg.auxiliary and cfg.aux_fraction > 0:
        aux = tuple(t.to(dev) for t in stack_samples(cfg.auxiliary, size))
        sources.append((aux, cfg.aux_fraction))  # type: ignore[arg-type]
    if cfg.init_weights is not None:
        net, spec = load_network(Path(cfg.init_weights))
        if spec != cfg.spec:
            raise ValueError(f"{cfg.init_weights}: architecture {spec} differs from the configured {cfg.spec}")
    else:
        net = build_network(cfg.spec)
    net = net.to(dev)
    info: dict = {"labelled_slices": len(labelled), "auxiliary_slices": len(cfg.auxiliary), "unlabeled_slices": len(unlabeled),
                  "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"}
    t0 = time.time()
    hist = _fit(net, sources, cfg.iterations, cfg, gen, log, "teacher")
    info["teacher_s"] = round(time.time() - t0, 1)
    info["teacher_final_loss"] = float(np.mean(hist[-50:])) if hist else None
    if on_teacher is not None:  # e.g. the cross-validation bench scores the teacher alone
        on_teacher(net)
    if unlabeled and cfg.student_iterations > 0:
        t1 = time.time()
        u_img = torch.from_numpy(np.stack([to_network_grid(u, None, size)[0] for u in unlabeled]))[:, None]
        u_lab = pseudo_label(net, u_img)
        info["pseudo_infected_fraction"] = float((u_lab > 0).float().mean())
        log(f"[pseudo] labelled {u_img.shape[0]} slices, infected pixels {info['pseudo_infected_fraction']:.3%} ({time.time() - t1:.0f} s)")
        # half of each batch pseudo-labelled, the auxiliary share kept, real slices the rest
        shares = [(real, 1.0)] + sources[1:] + [((u_img.to(dev), u_lab.to(dev)), 0.5)]
        hist = _fit(net, shares, cfg.student_iterations, cfg, gen, log, "student")  # type: ignore[arg-type]
        info["student_s"] = round(time.time() - t1, 1)
        info["student_final_loss"] = float(np.mean(hist[-50:])) if hist else None
    return net.cpu().eval(), info


# --- the library entry point -----------------------------------------------------------------
def _code_commit() -> str:
    """HEAD of the repository; ``COVIDTRACK_CODE_COMMIT`` when training on a copy without git."""
    if os.environ.get("COVIDTRACK_CODE_COMMIT"):
        return os.environ["COVIDTRACK_CODE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": settings().threads}


def load_training_data(cfg: TrainConfig) -> tuple[list, list, list[np.ndarray]]:
    """(train pairs, held-out SliceSamples, unlabelled unit images) as the config asks."""
    from covidtrack.segment.intensity import unit_from_uint8
    from covidtrack.segment.slices import read_medseg_folder, read_unlabeled

    samples = read_medseg_folder(cfg.images, cfg.masks, cfg.multiclass) if cfg.images is not None else []
    unknown = set(cfg.exclude) - {s.name for s in samples}
    if unknown:
        raise ValueError(f"exclude names not in {cfg.images}: {sorted(unknown)}")
    train_s = [s for s in samples if s.name not in cfg.exclude]
    held = [s for s in samples if s.name in cfg.exclude]
    pairs = labelled_pairs(train_s) + [(np.asarray(u, np.float32), np.asarray(c, np.uint8)) for u, c in cfg.extra]
    if not pairs:
        raise ValueError("no labelled training data: pass images/masks or extra samples")
    use_unl = cfg.unlabeled is not None and cfg.student_iterations > 0  # read only when self-training uses them
    unl = [unit_from_uint8(s.image) for s in read_unlabeled(cfg.unlabeled, stride=cfg.unlabeled_stride)] if use_unl else []
    return pairs, held, unl


def train(cfg: TrainConfig, log: Log = print) -> TrainResult:
    """Train a model version and write ``<out_root>/infection/<version>/`` (weights + card).

    The folder is written to a temporary sibling first and renamed, so a crash never leaves a
    half-written version behind.
    """
    from covidtrack import modelstore
    from covidtrack.segment.eval_slices import evaluate_model_on_samples, scores_to_json
    from covidtrack.segment.infection import InfectionModel, save_weights, write_card

    start = time.time()
    commit = _code_commit()  # at the start: HEAD may move while a long run trains
    if cfg.version:
        modelstore.check_new_version("infection", cfg.version)  # refused before the run, not after it
    pairs, held, unl = load_training_data(cfg)
    log(f"training infection model on {len(pairs)} labelled slices, {len(unl)} unlabelled, {len(held)} held out")
    net, info = fit_recipe(pairs, unl, cfg, log)
    root = Path(cfg.out_root) if cfg.out_root is not None else settings().models_dir
    version = cfg.version or modelstore.next_version("infection")
    final = root / "infection" / version
    if final.exists():
        raise FileExistsError(f"{final}: version exists and versions are immutable; pick another --version")
    holdout = None
    if held:
        model = InfectionModel(net, cfg.spec, f"infection/{version}", tta=True)
        holdout = scores_to_json(evaluate_model_on_samples(model, held))
        log(f"held-out Dice {holdout['mean']['dice']['mean']:.3f} on {len(held)} slices")
    wall = time.time() - start
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model version is meant to be shared
    try:
        sha = save_weights(net, cfg.spec, tmp / "weights.pt")
        card = _card(cfg, version, info, holdout, wall, sha, commit, len(pairs), len(held), len(unl))
        write_card(tmp, card)
        (tmp / "MODEL_CARD.md").write_text(model_card_markdown(card))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {final} in {wall:.0f} s")
    ref = modelstore.ModelRef(task="infection", version=version, path=final, shipped=(root.resolve() == modelstore.SHIPPED_MODELS.resolve()))
    return TrainResult(ref=ref, wall_s=wall, holdout=holdout)


def _card(
    cfg: TrainConfig, version: str, info: dict, holdout: dict | None, wall: float, sha: str, commit: str, n_train: int, n_held: int, n_unl: int
) -> dict:
    real_share = 1.0 - (cfg.aux_fraction if cfg.auxiliary else 0.0)
    epochs = cfg.iterations * cfg.batch_size * real_share / max(1, n_train)  # passes over the real slices
    k = cfg.intensity_aug
    return {
        "task": "infection",
        "version": version,
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code_commit": commit,
        "weights_sha256": sha,
        "labels": {"0": "none", "1": "GGO", "2": "consolidation"},
        "net": {"kind": "MONAI UNet 2D", **cfg.spec.to_json()},
        "input": "one axial slice, lung window W1400/L-500 HU (8-bit slices: 0..255 -> 0..1), square field "
        "of view (lung bounding box + 8 % for volumes, whole image for slices) resampled to input_size",
        "training_data": {
            "labelled": str(cfg.images.name if cfg.images else "none"),
            "labelled_slices": n_train,
            "extra_samples": len(cfg.extra),
            "auxiliary_samples": len(cfg.auxiliary),
            "auxiliary_sources": cfg.aux_sources or None,
            "auxiliary_share_of_batch": cfg.aux_fraction if cfg.auxiliary else 0.0,
            "unlabeled_slices": n_unl,
            "held_out": sorted(cfg.exclude),
            "sources": "MedSeg COVID-19 CT segmentation (Radiopaedia/SIRM) via DengPingFan/Inf-Net @ c17e524 "
            "Dataset/TrainingSet (50 expert-labelled slices); COVID-19-CT-Seg slices (coronacases 001-010, "
            "10 Radiopaedia cases), unlabelled, same source",
            "licence": LICENCE_NOTE,
        },
        "training": {
            "seed": cfg.seed,
            "teacher_iterations": cfg.iterations,
            "student_iterations": cfg.student_iterations if n_unl else 0,
            "batch_size": cfg.batch_size,
            "intensity_aug": cfg.intensity_aug,
            "approx_epochs_teacher": round(epochs, 1),
            "optimizer": f"AdamW lr {cfg.lr}, 5 % linear warm-up then cosine decay, weight decay 1e-4",
            "loss": "DiceCE (GGO, consolidation) + soft Dice of GGO+consolidation union",
            "augmentation": "rotation +-15 deg, scale 0.8-1.25, shift +-8 %, left-right flip, elastic (5x5 "
            f"control points, 3 %), re-windowing (scale {0.55 ** k:.2f}-{1.35 ** k:.2f}, offset +-{0.12 * k:.3f}), "
            f"gamma {0.7 ** k:.2f}-{1.5 ** k:.2f}, Gaussian noise <= {0.03 * k:.3f} (intensity strength {k})",
            "self_training": "teacher labels unlabelled slices (flip TTA); student fine-tuned from the teacher, "
            "half of each batch pseudo-labelled, the rest real (and auxiliary)" if n_unl and cfg.student_iterations else "none",
            "init_weights": str(cfg.init_weights) if cfg.init_weights else None,
            "wall_time_s": round(wall, 1),
            "hardware": hardware(),
            "details": info,
        },
        "holdout_metrics": holdout["mean"] if holdout else None,
        "validation": cfg.validation,
        "notes": cfg.notes,
    }


def record_validation(folder: Path, validation: dict) -> dict:
    """Add validation results (e.g. the cross-validation of this recipe) to a version's card.

    Only ``card.json``'s ``validation`` field and ``MODEL_CARD.md`` change; the weights and their
    checksum stay as trained.
    """
    from covidtrack.segment.infection import write_card

    card = json.loads((folder / "card.json").read_text())
    card["validation"] = validation
    write_card(folder, card)
    (folder / "MODEL_CARD.md").write_text(model_card_markdown(card))
    return card


def model_card_markdown(card: dict) -> str:
    """A readable MODEL_CARD.md from card.json."""
    t, d = card["training"], card["training_data"]
    lines = [
        f"# Infection model {card['task']}/{card['version']}",
        "",
        "Labels GGO (1) and consolidation (2) on axial CT slices; a 2D "
        f"{card['net']['kind']} (channels {card['net']['channels']}, {card['net']['num_res_units']} residual units, "
        f"{card['net']['input_size']} px input).",
        "",
        f"**Licence: {d['licence']}**",
        "",
        "## Training data",
        f"- {d['sources']}",
        f"- {d['labelled_slices']} labelled slices used, {d['extra_samples']} extra samples, "
        f"{d['unlabeled_slices']} unlabelled slices for self-training; held out: {d['held_out'] or 'none'}",
        *([f"- auxiliary (never replacing the real slices; {d.get('auxiliary_share_of_batch', 0):.0%} of each batch): "
           f"{d['auxiliary_samples']} slices, {d.get('auxiliary_sources') or ''}"] if d.get("auxiliary_samples") else []),
        "",
        "## Training",
        f"- seed {t['seed']}; teacher {t['teacher_iterations']} steps of {t['batch_size']} slices "
        f"(~{t['approx_epochs_teacher']} epochs), student {t['student_iterations']} steps",
        f"- optimiser: {t['optimizer']}; loss: {t['loss']}",
        f"- augmentation: {t['augmentation']}",
        f"- self-training: {t['self_training']}",
        f"- wall time {t['wall_time_s']} s on {t['hardware']['processor']} ({t['hardware']['cpu_count']} CPU cores, "
        f"{t['hardware']['threads']} threads{', shared machine' if (t['hardware']['cpu_count'] or 0) <= 2 else ''})"
        + (f"; trained on {t['details']['device']}" if t.get("details", {}).get("device", "cpu") != "cpu" else ""),
        f"- code commit {card['code_commit']}, created {card['created_utc']}",
        "",
        "## Validation",
    ]
    if card.get("validation"):
        v = card["validation"]
        lines.append(f"- {v.get('description', 'cross-validation')}")
        for k, m in v.get("summary", {}).items():
            lines.append(f"- {k}: mean {m['mean']:.3f}, std over folds {m['std']:.3f}" if m.get("mean") is not None else f"- {k}: n/a")
        for variant, ms in v.get("variants", {}).items():
            parts = [f"{k} {x['mean_over_folds']:.3f}" for k, x in ms.items() if x.get("mean_over_folds") is not None]
            lines.append(f"- ablation, {variant}: " + ", ".join(parts))
    if card.get("holdout_metrics"):
        for k, m in card["holdout_metrics"].items():
            if m["mean"] is not None:
                lines.append(f"- held-out {k}: {m['mean']:.3f} +- {m['std']:.3f} (n={m['n']})")
    if not card.get("validation") and not card.get("holdout_metrics"):
        lines.append("- none recorded for this version")
    if card.get("notes"):
        lines += ["", "## Notes", card["notes"]]
    return "\n".join(lines) + "\n"


# --- CLI -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SHARED_COVID2D / "medseg_train"
    parser.add_argument("--images", type=Path, default=d / "Imgs", help="Imgs/ folder of labelled slices")
    parser.add_argument("--masks", type=Path, default=d / "GT", help="GT/ binary masks 0/255")
    parser.add_argument("--multiclass", type=Path, default=d / "GT_multiclass", help="GT_multiclass/ 0/1/2")
    parser.add_argument("--unlabeled", type=Path, default=SHARED_COVID2D / "unlabeled_slices", help="unlabelled slices for self-training")
    parser.add_argument("--no-self-training", action="store_true", help="teacher only, no pseudo-labels")
    parser.add_argument("--unlabeled-stride", type=int, default=4, help="use every n-th unlabelled slice")
    parser.add_argument("--iterations", type=int, default=300, help="teacher optimiser steps")
    parser.add_argument("--student-iterations", type=int, default=200, help="student optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--intensity-aug", type=float, default=1.0, help="strength of the intensity augmentation (1 = v1 recipe)")
    parser.add_argument("--size", type=int, default=192, help="network input side (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", default="", help="comma-separated slice names to hold out and score")
    parser.add_argument("--init-weights", type=Path, help="start from these weights.pt (fine-tuning)")
    parser.add_argument("--out", type=Path, help="models root (default $COVIDTRACK_HOME/models)")
    parser.add_argument("--version", help="version name (default: next free vN)")
    parser.add_argument("--validation-json", type=Path, help="cross-validation JSON (bench/results/infection_cv.json) to record in the card")
    parser.add_argument("--notes", default="")
    parser.add_argument("--negatives", type=Path, nargs="*", default=[], help="healthy CT files/folders: lung slices added with label 0")
    parser.add_argument("--phantom-negatives", type=int, default=0, help="healthy phantoms whose lung slices are added with label 0")
    parser.add_argument("--negative-stride", type=int, default=2, help="use every n-th lung slice of the negatives")
    parser.add_argument("--phantom-positives", type=int, default=0, help="sick phantoms (seeds 3000..) whose lung slices are added with their true lesions")
    parser.add_argument("--aux-npz", type=Path, nargs="*", default=[], help="auxiliary pairs prepared with bench/infection_aux.py (save_pairs)")
    parser.add_argument("--aux-fraction", type=float, default=0.25, help="share of each batch taken by negatives/phantom slices")
    parser.add_argument("--device", default="cpu", help="training device: cpu, cuda or auto")
    # HITL (covidtrack.hitl.retrain): fine-tune the ACTIVE model on the store's corrected scans
    parser.add_argument("--from-corrections", action="store_true",
                        help="fine-tune the active model on corrected scans + original slices (covidtrack.hitl.retrain)")
    parser.add_argument("--finetune-iterations", type=int, default=None, help="optimiser steps of --from-corrections (default 150)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "from_corrections", False):
        from covidtrack.hitl.retrain import run_cli

        return run_cli(args)
    validation = None
    if args.validation_json:
        cv = json.loads(Path(args.validation_json).read_text())
        validation = {"description": cv.get("description", ""), "summary": cv.get("summary", {}), "source": str(args.validation_json.name)}
    aux: list[tuple[np.ndarray, np.ndarray]] = []
    what: list[str] = []
    if args.negatives:
        aux += negatives_from_files(args.negatives, args.negative_stride)
        what.append(f"healthy lung slices of {', '.join(p.name for p in args.negatives)} (label 0)")
    if args.phantom_negatives:
        aux += negatives_from_phantoms(args.phantom_negatives, args.negative_stride)
        what.append(f"{args.phantom_negatives} healthy phantoms (label 0)")
    if args.phantom_positives:
        aux += phantom_slices(range(3000, 3000 + args.phantom_positives), args.negative_stride)
        what.append(f"{args.phantom_positives} sick phantoms, seeds 3000.. (true lesions)")
    for path in args.aux_npz:
        aux += load_pairs(path)
        made = path.with_suffix(".json")  # written beside it by bench/infection_aux.py
        what.append(f"{path.name} ({json.loads(made.read_text())})" if made.exists() else path.name)
    if aux:
        print(f"{len(aux)} auxiliary slices: {'; '.join(what)}")
    cfg = TrainConfig(
        auxiliary=tuple(aux),
        aux_fraction=args.aux_fraction,
        aux_sources="; ".join(what),
        device=args.device,
        images=args.images,
        masks=args.masks,
        multiclass=args.multiclass,
        unlabeled=None if args.no_self_training else args.unlabeled,
        unlabeled_stride=args.unlabeled_stride,
        init_weights=args.init_weights,
        exclude=tuple(n for n in args.exclude.split(",") if n),
        iterations=args.iterations,
        student_iterations=0 if args.no_self_training else args.student_iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        intensity_aug=args.intensity_aug,
        seed=args.seed,
        spec=replace(NetSpec(), input_size=args.size),
        out_root=args.out,
        version=args.version,
        validation=validation,
        notes=args.notes,
    )
    result = train(cfg)
    print(f"{result.ref.name} written to {result.ref.path} ({result.wall_s:.0f} s)")
    return 0

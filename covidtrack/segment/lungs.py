"""The lung model: a small 3D MONAI UNet on a coarse grid that labels right (1) and left (2) lung.

- :func:`build_network` defines the network and touches no files.
- :class:`LungModel` is the one inference class: :meth:`LungModel.load` reads a model version
  (weights + card), :meth:`LungModel.predict` labels a whole canonical :class:`Volume`.

Geometry: the scan is resampled to the model grid (``LungNetSpec.spacing_mm``, about 3-4 mm:
lungs are big, so coarse voxels cost nothing in Dice but make a whole chest one cheap forward
pass on a CPU). The softmax probabilities are interpolated back onto the scan grid (trilinear,
so borders are sub-voxel smooth, not blocky) and post-processed there: largest components per
side, hole filling, and a left / right split by geometry (canonical x runs patient right -> left).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from covidtrack.config import settings
from covidtrack.segment import weights
from covidtrack.segment.weights import sha256_of
from covidtrack.errors import InputError, ModelError
from covidtrack.events import ProgressCallback, emit
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG
from covidtrack.volume import Volume

if TYPE_CHECKING:
    import torch

    from covidtrack.modelstore import ModelRef

WEIGHTS_FORMAT = "covidtrack-lungs-3d-1"
#: HU window the network sees: air (-1024) -> -1, +600 HU (bone, contrast) and above -> about +1.
HU_LOW, HU_HIGH = -1024.0, 600.0


@dataclass(frozen=True)
class LungNetSpec:
    """Architecture and input grid of the lung network; stored in ``weights.pt`` and ``card.json``.

    ``spacing_mm`` is the (z, y, x) voxel size of the model grid in mm.
    """

    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    spacing_mm: tuple[float, float, float] = (4.0, 3.0, 3.0)
    out_classes: int = 3  # background, right lung, left lung

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LungNetSpec":
        return cls(
            channels=tuple(int(c) for c in data["channels"]),
            strides=tuple(int(s) for s in data["strides"]),
            num_res_units=int(data["num_res_units"]),
            spacing_mm=tuple(float(s) for s in data["spacing_mm"]),  # type: ignore[arg-type]
            out_classes=int(data.get("out_classes", 3)),
        )

    @property
    def divisor(self) -> int:
        """Model-grid sizes must be multiples of this (one factor 2 per stride)."""
        return int(np.prod(self.strides))


def build_network(spec: LungNetSpec) -> "torch.nn.Module":
    """The MONAI 3D UNet: 1 input channel (normalised HU), ``out_classes`` logits."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=spec.out_classes,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.num_res_units,
    )


def normalise_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> float32 in about [-1, 1] (clipped to [-1024, 600] HU): the one input scaling, train and infer."""
    x = np.clip(hu.astype(np.float32), HU_LOW, HU_HIGH)
    return (x - 0.5 * (HU_LOW + HU_HIGH)) / (0.5 * (HU_HIGH - HU_LOW))


def model_grid_shape(shape: tuple[int, ...], spacing: tuple[float, float, float], spec: LungNetSpec) -> tuple[int, int, int]:
    """Size of the model grid covering the same field of view (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, spec.spacing_mm))  # type: ignore[return-value]


def resample(x: "torch.Tensor", size: tuple[int, int, int], spacing: tuple[float, float, float], target_mm: tuple[float, float, float]) -> "torch.Tensor":
    """Resample (B, C, z, y, x) to ``size``: box-average by the integer part of the zoom first
    (anti-aliasing for 1 mm -> 3 mm), then trilinear. Works both ways (upsampling skips the box)."""
    import torch.nn.functional as F

    # (capped at the input's own size: a slab of a few thin slices is pooled to one model voxel)
    kernel = tuple(max(1, min(int(t // s), n)) for s, t, n in zip(spacing, target_mm, x.shape[2:]))
    if any(k > 1 for k in kernel):
        x = F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def pad_to_multiple(x: "torch.Tensor", divisor: int, value: float) -> tuple["torch.Tensor", tuple[int, int, int]]:
    """Pad the last three axes at their end to multiples of ``divisor``; returns the original size."""
    import torch.nn.functional as F

    size = tuple(int(s) for s in x.shape[-3:])
    pads: list[int] = []
    for s in reversed(size):
        pads += [0, (-s) % divisor]
    return F.pad(x, pads, value=value), size  # type: ignore[return-value]


def save_weights(network: "torch.nn.Module", spec: LungNetSpec, path: Path) -> str:
    """Write ``weights.pt`` (float16 tensors, see :mod:`covidtrack.segment.weights`) and return its sha256."""
    return weights.save(network, spec.to_json(), WEIGHTS_FORMAT, path)


def load_network(path: Path) -> tuple["torch.nn.Module", LungNetSpec]:
    """Read ``weights.pt`` written by :func:`save_weights` (float32 network, eval mode)."""
    net, spec_json = weights.load(
        path, WEIGHTS_FORMAT, "a lung model", lambda js: build_network(LungNetSpec.from_json(js)), "run `python -m covidtrack train lungs`"
    )
    return net, LungNetSpec.from_json(spec_json)


# --- post-processing (pure numpy, on the scan grid) ---------------------------------------------
def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k]) if mask[k].any() else mask[k]
    return out


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + margin + 1)) for i, n in zip(idx, mask.shape))


def _component_sizes(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxel count per label 1..n (bincount: far faster than ndimage.sum_labels for many labels)."""
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def body_midline(volume: Volume) -> tuple[float | None, float | None]:
    """The patient's midline as a fraction (0..1, may lie outside) of the canonical x axis:
    ``(midline, cut_hint)``.

    ``midline`` comes from the body (everything denser than -500 HU, largest piece, on a coarse
    subsample) when the field of view holds the whole body width; when the field of view cuts
    through the body (a small reconstruction centred on one lung), from the spine
    (:func:`_spine_midline`), else from world x = 0, where scanners centre the patient, if the
    grid is axis-aligned and spans it; else None. ``cut_hint``: for a
    body cut at one side of the field of view only, where the midline must lie (beyond that side:
    0 or 1); only good enough to place a single lung, not to judge two.
    """
    arr = volume.array[:: max(1, volume.shape[0] // 24), ::4, ::4]
    body = arr > -500
    cut_hint = None
    if body.any():
        lab, n = ndi.label(body)
        sizes = _component_sizes(lab, n)
        body = lab == int(np.argmax(sizes)) + 1
        low, high = body[:, :, 0].mean() > 0.02, body[:, :, -1].mean() > 0.02
        if not (low or high):
            xs = np.nonzero(body)[2]
            return float((xs.mean() + 0.5) / body.shape[2]), None
        if low != high:
            cut_hint = 0.0 if low else 1.0
        spine = _spine_midline(arr, body, float(volume.spacing[2]) * 4)
        if spine is not None and _vertebra_radius_mm(volume, spine) >= VERTEBRA_MIN_RADIUS_MM:
            return spine, cut_hint
    d = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    if np.allclose(d, np.eye(3), atol=1e-3):
        x0, sx, nx = float(volume.origin[0]), float(volume.spacing[2]), volume.shape[2]
        if x0 < 0 < x0 + (nx - 1) * sx:
            return float((-x0 / sx + 0.5) / nx), cut_hint
    return None, cut_hint


SPINE_MIN_HU = 180.0  # vertebral bone (cancellous bone ~200-400 HU, cortex far more)


def _spine_midline(arr: np.ndarray, body: np.ndarray, sx_mm: float) -> float | None:
    """The midline from the spine (fraction of the x axis), for a field of view that cuts the body.

    Bone in the posterior half of the body, counted per x column over all slices and smoothed
    over 30 mm: the vertebral column, present at the same x on every slice and deep along y
    (body, pedicles, spinous process), stands out against ribs and scapulae, which sit laterally
    and move from slice to slice. Accepted only when bone lies within 15 mm of that x on at least
    60 % of the slices that hold body; else None. :func:`body_midline` also checks that the bone
    there is as solid as a vertebral body (:func:`_vertebra_radius_mm`): a field of view without
    the spine offers ribs and a scapula instead.
    """
    ys = np.nonzero(body.any(axis=(0, 2)))[0]
    if ys.size < 2:
        return None
    back = np.zeros(body.shape, bool)
    back[:, int(np.median(np.nonzero(body)[1])):, :] = True
    bone = (arr > SPINE_MIN_HU) & back & ndi.binary_fill_holes(body, structure=np.ones((1, 3, 3), bool))
    if not bone.any():
        return None
    width = max(1, int(round(30.0 / sx_mm)))
    counts = ndi.uniform_filter1d(bone.sum(axis=(0, 1)).astype(float), width, mode="constant")
    xi = int(np.argmax(counts))
    reach = max(1, int(round(15.0 / sx_mm)))
    near = bone[:, :, max(0, xi - reach): xi + reach + 1].any(axis=(1, 2))
    slices = body.any(axis=(1, 2))
    if near[slices].mean() < 0.6:
        return None
    return float((xi + 0.5) / body.shape[2])


VERTEBRA_MIN_RADIUS_MM = 8.0  # a vertebral body holds a disk this wide; ribs and scapulae do not


def _vertebra_radius_mm(volume: Volume, xfrac: float, n_slices: int = 12) -> float:
    """How solid the bone at a candidate spine position is: on ``n_slices`` axial slices, the
    radius (mm) of the largest disk that fits in the bone (holes filled: the vertebral body's
    cortical ring with the spinal canal) within 10 mm of that x in the posterior half of the body;
    the 75th percentile over the slices. A vertebral body gives 11-16 mm on the real 512 series,
    the phantoms and Lung-PET-CT-Dx; the posterior ribs and the scapula that a field of view
    without the spine offers instead give 4-6 mm."""
    arr = volume.array
    nz, ny, nx = arr.shape
    sy, sx = float(volume.spacing[1]), float(volume.spacing[2])
    xc = int(xfrac * nx)
    half, near = int(40.0 / sx), max(1, int(10.0 / sx))
    x0, x1 = max(0, xc - half), min(nx, xc + half + 1)
    zs = np.nonzero((arr[:, ::4, ::4] > -500).any(axis=(1, 2)))[0]
    if zs.size == 0:
        return 0.0
    radii = []
    for z in zs[np.linspace(0, zs.size - 1, min(n_slices, zs.size)).astype(int)]:
        tissue = arr[z] > -500
        ymid = int(np.median(np.nonzero(tissue)[0]))
        bone = ndi.binary_fill_holes(arr[z, ymid:, x0:x1] > SPINE_MIN_HU)
        if not bone.any():
            radii.append(0.0)
            continue
        depth = ndi.distance_transform_edt(bone, sampling=(sy, sx))
        radii.append(float(depth[:, max(0, xc - x0 - near): xc - x0 + near + 1].max(initial=0.0)))
    return float(np.percentile(radii, 75))


def split_sides(mask: np.ndarray, max_erosions: int = 8, midline: float | None = None,
                cut_hint: float | None = None) -> np.ndarray:
    """Right (1) / left (2) labels for a binary lung mask, by geometry alone.

    Two big components (the usual case) are the two lungs, and by the definition of the canonical
    grid the one at lower x is the right lung. Lungs that touch at the anterior / posterior
    junction line form one component: it is eroded step by step until it falls apart in two big
    cores, and every voxel goes to the nearer core. ``midline`` (x index on the mask's grid, from
    :func:`body_midline`) settles the rest: a mask that never splits, or whose two cores lie on
    one side of it, is one lung (all on the side of the midline it lies on) or fused lungs (cut at
    the midline). ``cut_hint`` (x index) places a mask that never splits when only that is known
    (a field of view cut at one side). Without either such a mask is cut at the x centre of its
    bounding box. The network is not asked for the side:
    with its limited receptive field it cannot see the midline from inside a lung.
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return out
    cores = None
    work = mask
    for _ in range(max_erosions + 1):
        lab, n = ndi.label(work)
        if n >= 2:
            sizes = _component_sizes(lab, n)
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] >= 0.15 * sizes[order[0]]:
                cores = (lab == order[0] + 1, lab == order[1] + 1)
                break
        work = ndi.binary_erosion(work)
        if not work.any():
            break
    if cores is not None and midline is not None:
        # two cores on one side of the body's midline are one lung that erosion split (the other
        # lung missing: cropped, removed, or consolidated and left out by the network)
        xa, xb = (float(np.nonzero(c)[2].mean()) for c in cores)
        if (xa - midline) * (xb - midline) > 0:
            cores = None
    if cores is None:
        xs = np.nonzero(mask.any(axis=(0, 1)))[0]
        midline = midline if midline is not None else cut_hint
        mid = midline if midline is not None else 0.5 * (xs.min() + xs.max())
        cut = int(np.ceil(mid))
        on_left = int(mask[:, :, cut:].sum())
        if midline is not None and on_left < 0.1 * mask.sum():
            out[mask] = RIGHT_LUNG  # one lung, on the patient's right of the midline
        elif midline is not None and on_left > 0.9 * mask.sum():
            out[mask] = LEFT_LUNG
        else:
            out[mask] = RIGHT_LUNG
            out[:, :, cut:][mask[:, :, cut:]] = LEFT_LUNG
        return out
    a_right = np.nonzero(cores[0])[2].mean() < np.nonzero(cores[1])[2].mean()
    seeds = np.zeros(mask.shape, dtype=np.uint8)
    seeds[cores[0]] = RIGHT_LUNG if a_right else LEFT_LUNG
    seeds[cores[1]] = LEFT_LUNG if a_right else RIGHT_LUNG
    _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = seeds[tuple(idx)]
    out[mask] = nearest[mask]
    return out


def fill_nearest(labels: np.ndarray) -> np.ndarray:
    """Every voxel gets the label of the nearest labelled voxel (for mapping sides to finer grids)."""
    if not labels.any():
        return labels
    _, idx = ndi.distance_transform_edt(labels == 0, return_indices=True)
    return labels[tuple(idx)]


def _assign_fragments(clean: np.ndarray, frag: np.ndarray) -> None:
    """Give each fragment (connected piece of ``frag``) to the lung side it touches most, in place."""
    lab, n = ndi.label(frag)
    if n == 0:
        return
    touch = np.zeros((3, n + 1), dtype=np.int64)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        ring = ndi.binary_dilation(clean == side) & frag
        touch[side] = np.bincount(lab[ring], minlength=n + 1)
    best = np.where(touch[RIGHT_LUNG] >= touch[LEFT_LUNG], RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)
    best[(touch[RIGHT_LUNG] + touch[LEFT_LUNG]) == 0] = 0  # touches no lung: drop it
    best[0] = 0
    clean[frag] = best[lab[frag]]


def postprocess(p_lung: np.ndarray, side: np.ndarray, min_fraction: float = 0.02) -> np.ndarray:
    """Lung probability and a side map (1 right / 2 left, from :func:`split_sides`) on the scan
    grid -> uint8 label map (0 / 1 right / 2 left).

    1. lung = P(lung) > 0.5; components smaller than ``min_fraction`` of the largest are dropped
       (bowel gas, noise);
    2. each lung voxel takes its side from ``side``; per side only the largest piece stays and
       stray pieces join the lung they touch (else they are dropped);
    3. a side whose centre lies on the wrong half is swapped (canonical x: right lung = low x);
    4. holes are filled per side in 3D and per axial slice (vessels, bronchi inside the lung).
    """
    lung = p_lung > 0.5
    out = np.zeros(lung.shape, dtype=np.uint8)
    if not lung.any():
        return out
    box = _bbox(lung)
    lung = lung[box]
    lab, n = ndi.label(lung)
    sizes = _component_sizes(lab, n)
    lung = np.isin(lab, np.nonzero(sizes >= min_fraction * sizes.max())[0] + 1)
    sides = np.where(lung, side[box], 0).astype(np.uint8)
    clean = np.zeros(lung.shape, dtype=np.uint8)
    for s_ in (RIGHT_LUNG, LEFT_LUNG):
        slab, sn = ndi.label(sides == s_)
        if sn:
            clean[slab == (int(np.argmax(_component_sizes(slab, sn))) + 1)] = s_
    _assign_fragments(clean, lung & (clean == 0))
    if (clean == RIGHT_LUNG).any() and (clean == LEFT_LUNG).any():
        if np.nonzero(clean == RIGHT_LUNG)[2].mean() > np.nonzero(clean == LEFT_LUNG)[2].mean():
            clean = np.where(clean > 0, 3 - clean, 0).astype(np.uint8)
    for s_ in (RIGHT_LUNG, LEFT_LUNG):
        m = clean == s_
        if not m.any():
            continue
        sb = _bbox(m)
        filled = _fill_holes_per_slice(ndi.binary_fill_holes(m[sb]))
        target = clean[sb]
        target[filled & (target == 0)] = s_
    out[box] = clean
    return out


class LungModel:
    """Inference with one lung model version. Build with :meth:`load`; ``version`` is ``"lungs/vN"``."""

    def __init__(self, network: "torch.nn.Module", spec: LungNetSpec, version: str) -> None:
        self.network = network.eval()
        self.spec = spec
        self.version = version

    @classmethod
    def load(cls, ref: "ModelRef | None" = None) -> "LungModel":
        """Load a version (``None``: the active one of task "lungs"), checking it against its card."""
        import torch

        from covidtrack import modelstore

        ref = ref or modelstore.active("lungs")
        card = ref.card()
        if card.get("task") != "lungs":
            raise ModelError(f"{ref.path / 'card.json'}: task is {card.get('task')!r}, expected 'lungs'")
        expected = card.get("weights_sha256")
        if expected and sha256_of(ref.weights) != expected:
            raise ModelError(f"{ref.weights}: checksum differs from card.json; the file was changed, restore or retrain it")
        torch.set_num_threads(settings().threads)
        net, spec = load_network(ref.weights)
        return cls(net, spec, ref.name)

    def probabilities(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> "torch.Tensor":
        """Softmax (1, 3, z, y, x) on the MODEL grid for a canonical HU array with (z, y, x) spacing in mm."""
        import torch

        size = model_grid_shape(hu.shape, spacing, self.spec)
        x = torch.from_numpy(normalise_hu(hu))[None, None]
        x = resample(x, size, spacing, self.spec.spacing_mm)
        x, _ = pad_to_multiple(x, self.spec.divisor, value=-1.0)  # pad with air
        with torch.inference_mode():
            probs = torch.softmax(self.network(x), dim=1)
        return probs[..., : size[0], : size[1], : size[2]]

    def predict(self, volume: Volume, progress: ProgressCallback | None = None) -> np.ndarray:
        """Label the lungs of a canonical volume: uint8 (z, y, x), 0 background, 1 right, 2 left."""
        if min(volume.shape) < 2:
            raise InputError(volume.meta.source_name or "<volume>", f"shape {volume.shape} is not a 3D CT", "load a CT series with several slices")
        emit(progress, "lungs", 0.05, "lungs: resampling to the model grid")
        probs = self.probabilities(volume.array, volume.spacing)
        emit(progress, "lungs", 0.5, "lungs: network done, mapping back to the scan grid")
        # the network decides lung vs not lung; the side comes from geometry on the model grid
        p_lung = probs[0, 1] + probs[0, 2]
        coarse = p_lung.numpy() > 0.5
        out = np.zeros(volume.shape, dtype=np.uint8)
        if not coarse.any():
            emit(progress, "lungs", 1.0, "lungs: none found")
            return out
        lab, n = ndi.label(coarse)
        sizes = _component_sizes(lab, n)
        coarse = np.isin(lab, np.nonzero(sizes >= 0.02 * sizes.max())[0] + 1)
        mid, hint = body_midline(volume)
        nx = coarse.shape[2]
        side_coarse = fill_nearest(split_sides(coarse, midline=None if mid is None else mid * nx - 0.5,
                                               cut_hint=None if hint is None else hint * nx - 0.5))
        # map back only the lungs' bounding box (plus a model voxel) to save time and memory
        lo = [int(i.min()) for i in np.nonzero(p_lung.numpy() > 0.25)]
        hi = [int(i.max()) + 1 for i in np.nonzero(p_lung.numpy() > 0.25)]
        full_box: list[slice] = []
        for axis in range(3):
            n_full, n_model = volume.shape[axis], probs.shape[2 + axis]
            scale = n_full / n_model
            a = max(0, int(np.floor((lo[axis] - 1) * scale)))
            b = min(n_full, int(np.ceil((hi[axis] + 1) * scale)))
            full_box.append(slice(a, b))
        up = _upsample_box(p_lung[None], volume.shape, full_box)[0]
        # side of each scan voxel: the model voxel that contains its centre
        near = [np.minimum(((np.arange(sl.start, sl.stop) + 0.5) * probs.shape[2 + a] / volume.shape[a]).astype(int),
                           probs.shape[2 + a] - 1) for a, sl in enumerate(full_box)]
        side_full = side_coarse[np.ix_(*near)]
        out[tuple(full_box)] = postprocess(up, side_full)
        emit(progress, "lungs", 1.0, "lungs: done")
        return out


def _linear_weights(n_full: int, n_model: int, sl: slice) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Indices and weights of 1D linear interpolation, the align_corners=False mapping of
    ``F.interpolate`` (source index clamped at 0 and n-1, as PyTorch does)."""
    import torch

    i = torch.arange(sl.start, sl.stop, dtype=torch.float64)
    src = ((i + 0.5) * (n_model / n_full) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_model - 1)
    i1 = (i0 + 1).clamp(max=n_model - 1)
    w = (src - i0.double()).clamp(0.0, 1.0).float()
    return i0, i1, w


def _upsample_box(probs: "torch.Tensor", shape: tuple[int, int, int], box: list[slice]) -> np.ndarray:
    """(C, z, y, x) model-grid probabilities -> (C, *box) values on the scan grid.

    Trilinear interpolation done separably (one axis at a time, each pass a gather and a
    blend), evaluated only inside ``box``: the same numbers as ``F.interpolate(...,
    mode="trilinear", align_corners=False)`` on the full grid, several times faster than
    ``grid_sample`` on CPU and without the full-size tensor.
    """
    import torch

    x = probs.float()
    with torch.inference_mode():
        # the axis with the smallest growth first keeps intermediate tensors small
        for axis in sorted(range(3), key=lambda a: (box[a].stop - box[a].start) / probs.shape[1 + a]):
            i0, i1, w = _linear_weights(shape[axis], probs.shape[1 + axis], box[axis])
            view = [1, 1, 1, 1]
            view[1 + axis] = -1
            w = w.view(view)
            x = x.index_select(1 + axis, i0) * (1 - w) + x.index_select(1 + axis, i1) * w
    return x.numpy()


def write_card(folder: Path, card: dict) -> None:
    """Write ``card.json`` (sorted keys, so cards diff cleanly)."""
    (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")

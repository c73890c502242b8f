"""The infection model: a 2D MONAI UNet that labels GGO (1) and consolidation (2) on axial slices.

- :func:`build_network` defines the network and touches no files.
- :class:`InfectionModel` is the one inference class: :meth:`InfectionModel.load` reads a model
  version (weights + card), :meth:`InfectionModel.predict` labels a whole HU volume inside a
  lung mask, :meth:`InfectionModel.predict_slices` labels 2D unit-range slices (evaluation).

Geometry: the network sees a square field of view resampled to ``input_size`` pixels. For 2D
slices the square is the whole (padded) image, as in training; for a volume it is the bounding
box of the lungs plus a margin, taken in millimetres so that anisotropic pixels stay square
(:class:`SquareView`). The same square is used to map the probabilities back onto the scan grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidtrack.config import settings
from covidtrack.segment import weights
from covidtrack.segment.weights import sha256_of
from covidtrack.errors import InputError, ModelError
from covidtrack.events import ProgressCallback, emit
from covidtrack.segment.intensity import window_hu

if TYPE_CHECKING:
    import torch

    from covidtrack.modelstore import ModelRef

WEIGHTS_FORMAT = "covidtrack-infection-2d-1"
#: Margin around the lung bounding box (fraction of its larger side, each side): the training
#: slices are cropped to the chest wall, a little outside the lungs.
VOLUME_MARGIN = 0.08
#: Infection threshold on P(GGO) + P(consolidation).
INFECTION_THRESHOLD = 0.5


@dataclass(frozen=True)
class NetSpec:
    """Architecture of the 2D network; stored in ``weights.pt`` and ``card.json``.

    ``input_size`` is the side (pixels) of the square the network sees.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0
    input_size: int = 192
    out_classes: int = 3  # background, GGO, consolidation

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "NetSpec":
        return cls(
            channels=tuple(int(c) for c in data["channels"]),
            strides=tuple(int(s) for s in data["strides"]),
            num_res_units=int(data["num_res_units"]),
            dropout=float(data.get("dropout", 0.0)),
            input_size=int(data["input_size"]),
            out_classes=int(data.get("out_classes", 3)),
        )


def build_network(spec: NetSpec) -> "torch.nn.Module":
    """The MONAI 2D UNet: 1 input channel (lung-window unit image), ``out_classes`` logits."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=spec.out_classes,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.num_res_units,
        dropout=spec.dropout,
    )


@dataclass(frozen=True)
class SquareView:
    """A square field of view on a 2D grid.

    ``center_yx`` in pixel indices, ``half_mm`` half the side in mm, ``spacing_yx`` pixel size
    in mm, ``shape_yx`` the grid's size in pixels.
    """

    center_yx: tuple[float, float]
    half_mm: float
    spacing_yx: tuple[float, float]
    shape_yx: tuple[int, int]

    @classmethod
    def whole_image(cls, shape_yx: tuple[int, int]) -> "SquareView":
        """The whole image padded to a square (1 mm pixels by convention for 2D slices)."""
        h, w = shape_yx
        return cls(((h - 1) / 2.0, (w - 1) / 2.0), max(h, w) / 2.0, (1.0, 1.0), (h, w))

    @classmethod
    def around_mask(cls, mask: np.ndarray, spacing_yx: tuple[float, float], margin: float = VOLUME_MARGIN) -> "SquareView":
        """The square around the (y, x) bounding box of ``mask`` (2D or 3D, last axes y, x) plus a margin."""
        proj = mask.reshape(-1, *mask.shape[-2:]).any(axis=0)
        ys, xs = np.nonzero(proj.any(axis=1))[0], np.nonzero(proj.any(axis=0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1], xs[0], xs[-1]
        side_mm = max((y1 - y0 + 1) * spacing_yx[0], (x1 - x0 + 1) * spacing_yx[1])
        return cls(
            ((y0 + y1) / 2.0, (x0 + x1) / 2.0),
            side_mm / 2.0 * (1.0 + 2.0 * margin),
            (float(spacing_yx[0]), float(spacing_yx[1])),
            (int(proj.shape[0]), int(proj.shape[1])),
        )

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box ``(y0, y1, x0, x1)`` (end exclusive) of the grid covered by the square."""
        hy, hx = self.half_mm / self.spacing_yx[0], self.half_mm / self.spacing_yx[1]
        cy, cx = self.center_yx
        h, w = self.shape_yx
        return (
            max(0, int(np.floor(cy - hy))),
            min(h, int(np.ceil(cy + hy)) + 1),
            max(0, int(np.floor(cx - hx))),
            min(w, int(np.ceil(cx + hx)) + 1),
        )

    def sampling_grid(self, size: int) -> "torch.Tensor":
        """``grid_sample`` grid (1, size, size, 2) that reads the square out of the full grid."""
        import torch

        u = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0  # pixel centres in (-1, 1)
        h, w = self.shape_yx
        y = self.center_yx[0] + u * self.half_mm / self.spacing_yx[0]
        x = self.center_yx[1] + u * self.half_mm / self.spacing_yx[1]
        gy = (2.0 * y + 1.0) / h - 1.0  # align_corners=False normalised coordinates
        gx = (2.0 * x + 1.0) / w - 1.0
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        return torch.stack((xx, yy), dim=-1)[None]

    def inverse_grid(self) -> "torch.Tensor":
        """``grid_sample`` grid (1, h, w, 2) that reads network output back onto :meth:`box`."""
        import torch

        y0, y1, x0, x1 = self.box()
        y = torch.arange(y0, y1, dtype=torch.float32)
        x = torch.arange(x0, x1, dtype=torch.float32)
        uy = (y - self.center_yx[0]) * self.spacing_yx[0] / self.half_mm
        ux = (x - self.center_yx[1]) * self.spacing_yx[1] / self.half_mm
        yy, xx = torch.meshgrid(uy, ux, indexing="ij")
        return torch.stack((xx, yy), dim=-1)[None]


def resample_to_view(images: "torch.Tensor", view: SquareView, size: int, mode: str = "bilinear") -> "torch.Tensor":
    """(B, C, H, W) on the full grid -> (B, C, size, size) inside ``view`` (zeros outside the grid)."""
    import torch.nn.functional as F

    grid = view.sampling_grid(size).expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def labels_from_probs(
    probs: np.ndarray, threshold: float = INFECTION_THRESHOLD, cons_bias: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (3, ...) -> (labels uint8 0/1/2, infection probability float32).

    Infection where P(GGO) + P(consolidation) >= ``threshold`` (0.5); its type is consolidation
    where P(consolidation) > ``cons_bias`` x P(GGO), else GGO. Deciding "infected" on the sum first
    keeps voxels whose probability is split between the two types. The defaults are the product's
    rule; other values exist for the post-processing study (bench/infection_postprocess.py).
    """
    p_inf = probs[1] + probs[2]
    labels = np.where(p_inf >= threshold, np.where(probs[2] > cons_bias * probs[1], 2, 1), 0).astype(np.uint8)
    return labels, p_inf.astype(np.float32)


def save_weights(network: "torch.nn.Module", spec: NetSpec, path: Path) -> str:
    """Write ``weights.pt`` (float16 tensors, see :mod:`covidtrack.segment.weights`) and return its sha256."""
    return weights.save(network, spec.to_json(), WEIGHTS_FORMAT, path)


def load_network(path: Path) -> tuple["torch.nn.Module", NetSpec]:
    """Read ``weights.pt`` written by :func:`save_weights` (float32 network, eval mode)."""
    net, spec_json = weights.load(
        path, WEIGHTS_FORMAT, "an infection model", lambda js: build_network(NetSpec.from_json(js)), "train one"
    )
    return net, NetSpec.from_json(spec_json)


class InfectionModel:
    """Inference with one infection model version. Build with :meth:`load`.

    ``version`` is ``"infection/vN"``; ``tta`` averages the prediction with that of the
    left-right mirrored input (test-time augmentation; costs a second forward pass).
    """

    def __init__(self, network: "torch.nn.Module", spec: NetSpec, version: str, tta: bool = True, batch_size: int = 8) -> None:
        self.network = network.eval()
        self.spec = spec
        self.version = version
        self.tta = tta
        self.batch_size = batch_size

    @classmethod
    def load(cls, ref: "ModelRef | None" = None, tta: bool = True) -> "InfectionModel":
        """Load a version (``None``: the active one of task "infection"), checking it against its card."""
        import torch

        from covidtrack import modelstore

        ref = ref or modelstore.active("infection")
        card = ref.card()
        if card.get("task") != "infection":
            raise ModelError(f"{ref.path / 'card.json'}: task is {card.get('task')!r}, expected 'infection'")
        expected = card.get("weights_sha256")
        if expected and sha256_of(ref.weights) != expected:
            raise ModelError(f"{ref.weights}: checksum differs from card.json; the file was changed, restore or retrain it")
        torch.set_num_threads(settings().threads)
        net, spec = load_network(ref.weights)
        return cls(net, spec, ref.name, tta=tta)

    # --- core ---------------------------------------------------------------------------------
    def _probs(self, batch: "torch.Tensor") -> "torch.Tensor":
        """(B, 1, S, S) unit images -> (B, 3, S, S) softmax probabilities (with flip TTA)."""
        import torch

        dev = next(self.network.parameters()).device  # CPU in the product; a GPU while training
        with torch.inference_mode():
            batch = batch.to(dev)
            probs = torch.softmax(self.network(batch), dim=1)
            if self.tta:
                flipped = torch.softmax(self.network(torch.flip(batch, dims=(3,))), dim=1)
                probs = 0.5 * (probs + torch.flip(flipped, dims=(3,)))
        return probs.cpu()

    def slice_probabilities(self, images_unit: Sequence[np.ndarray]) -> list[np.ndarray]:
        """2D canonical slices in [0, 1] (any size each) -> per slice the softmax (3, H, W), float32.

        No lung mask is applied: this is the path for 2D evaluation against expert masks.
        """
        import torch
        import torch.nn.functional as F

        out: list[np.ndarray] = []
        size = self.spec.input_size
        for img in images_unit:
            if img.ndim != 2:
                raise ValueError(f"expected 2D slices, got shape {img.shape}")
            view = SquareView.whole_image(img.shape)
            x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
            probs = self._probs(resample_to_view(x, view, size))
            back = F.grid_sample(probs, view.inverse_grid(), mode="bilinear", padding_mode="border", align_corners=False)
            out.append(back[0].numpy())
        return out

    def predict_slices(self, images_unit: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """2D canonical slices in [0, 1] (any size each) -> per slice (labels uint8 0/1/2, prob float16)."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for probs in self.slice_probabilities(images_unit):
            labels, p_inf = labels_from_probs(probs)
            out.append((labels, p_inf.astype(np.float16)))
        return out

    def predict(
        self,
        ct_hu: np.ndarray,
        lungs: np.ndarray,
        spacing: Sequence[float],
        progress: ProgressCallback | None = None,
        region: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Label infection in a canonical HU volume.

        ``ct_hu`` (z, y, x) HU, ``lungs`` (z, y, x) lung mask (any non-zero = lung), ``spacing``
        (z, y, x) mm. Returns ``(labels, prob)``: uint8 0 none / 1 GGO / 2 consolidation and the
        float16 infection probability, both zero outside the lungs. ``region`` (same shape)
        widens where labels are kept (e.g. a margin around the lungs, see
        :mod:`covidtrack.segment.completion`); the field of view still follows ``lungs``.
        """
        import torch
        import torch.nn.functional as F

        if ct_hu.ndim != 3 or lungs.shape != ct_hu.shape:
            raise InputError("<array>", f"ct {ct_hu.shape} and lungs {lungs.shape} must be equal 3D shapes", "pass the lung mask of this volume")
        labels = np.zeros(ct_hu.shape, dtype=np.uint8)
        prob = np.zeros(ct_hu.shape, dtype=np.float16)
        in_lungs = lungs > 0
        inside = in_lungs if region is None else (region > 0) | in_lungs
        if not in_lungs.any():
            return labels, prob
        zs = np.nonzero(inside.any(axis=(1, 2)))[0]
        view = SquareView.around_mask(in_lungs[np.nonzero(in_lungs.any(axis=(1, 2)))[0]], (float(spacing[1]), float(spacing[2])))
        y0, y1, x0, x1 = view.box()
        inv = view.inverse_grid()
        size = self.spec.input_size
        for start in range(0, zs.size, self.batch_size):
            z = zs[start : start + self.batch_size]
            x = torch.from_numpy(window_hu(ct_hu[z]))[:, None]
            probs = self._probs(resample_to_view(x, view, size))
            back = F.grid_sample(probs, inv.expand(len(z), -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False)
            lab, p_inf = labels_from_probs(back.numpy().transpose(1, 0, 2, 3))
            m = inside[z, y0:y1, x0:x1]
            labels[z, y0:y1, x0:x1] = np.where(m, lab, 0)
            prob[z, y0:y1, x0:x1] = np.where(m, p_inf, 0).astype(np.float16)
            emit(progress, "infection", (start + len(z)) / zs.size, f"infection {start + len(z)}/{zs.size} slices")
        return labels, prob


def write_card(folder: Path, card: dict) -> None:
    """Write ``card.json`` (sorted keys, so cards diff cleanly)."""
    (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")

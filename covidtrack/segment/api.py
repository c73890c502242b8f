"""``segment(volume)``: lungs -> infection (inside the lungs) -> lobes, one call, on the scan grid.

Loaded models are cached per version folder for the life of the process (the UI and batch jobs
segment many scans; loading costs ~0.1-0.5 s each time). Changing the active version is picked
up on the next call because the cache key is the resolved version.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidtrack import modelstore
from covidtrack.events import Progress, ProgressCallback, emit
from covidtrack.segment.completion import complete_lungs
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

if TYPE_CHECKING:
    from covidtrack.segment.infection import InfectionModel
    from covidtrack.segment.lungs import LungModel

#: Share of the overall progress bar per stage (measured roughly on the 512x512x141 series).
STAGES: dict[str, tuple[float, float]] = {"lungs": (0.0, 0.3), "infection": (0.3, 0.8), "lobes": (0.8, 1.0)}


@lru_cache(maxsize=4)
def _lung_model(path: Path, task: str, version: str, shipped: bool) -> "LungModel":
    from covidtrack.segment.lungs import LungModel

    return LungModel.load(modelstore.ModelRef(task=task, version=version, path=path, shipped=shipped))


@lru_cache(maxsize=4)
def _infection_model(path: Path, task: str, version: str, shipped: bool) -> "InfectionModel":
    from covidtrack.segment.infection import InfectionModel

    return InfectionModel.load(modelstore.ModelRef(task=task, version=version, path=path, shipped=shipped))


def _cached(loader: Callable, ref: modelstore.ModelRef):
    return loader(ref.path, ref.task, ref.version, ref.shipped)


def _stage(progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    """A callback that maps a stage's own 0..1 progress onto its share of the overall bar."""
    if progress is None:
        return None
    lo, hi = STAGES[stage]

    def forward(event: Progress) -> None:
        emit(progress, stage, lo + (hi - lo) * event.fraction, event.message, event.item)

    return forward


def lobes_available() -> bool:
    """True when the lobes module is installed (it is a separate piece of work)."""
    return importlib.util.find_spec("covidtrack.segment.lobes") is not None


def segment(
    volume: Volume,
    progress: ProgressCallback | None = None,
    *,
    lungs_ref: modelstore.ModelRef | None = None,
    infection_ref: modelstore.ModelRef | None = None,
    lobes: bool = True,
    complete: bool = True,
) -> Segmentation:
    """Segment lungs (1 right, 2 left), infection (1 GGO, 2 consolidation) and lobes (1-5).

    Models default to the active versions (:func:`covidtrack.modelstore.active`). All label maps
    are uint8 on ``volume``'s canonical grid; infection is zero outside the lungs. ``lobes`` is
    ``None`` only when the lobes module is not installed or ``lobes=False``. With ``complete``
    (the default), dense infection the infection model finds just outside the lung model's mask
    and touching it is added to the lungs (:func:`covidtrack.segment.completion.complete_lungs`).
    ``progress`` receives :class:`~covidtrack.events.Progress` events with stages "lungs",
    "infection", "lobes" and an overall fraction in [0, 1].
    """
    item = volume.meta.source_name
    emit(progress, "lungs", 0.0, "loading the lung model", item)
    lung_model = _cached(_lung_model, lungs_ref or modelstore.active("lungs"))
    lungs = lung_model.predict(volume, progress=_stage(progress, "lungs"))
    versions = {"lungs": lung_model.version}

    emit(progress, "infection", STAGES["infection"][0], "loading the infection model", item)
    inf_model = _cached(_infection_model, infection_ref or modelstore.active("infection"))
    if complete:  # dense infection at the lung border joins the lung (covidtrack.segment.completion)
        lungs, infection, prob, _ = complete_lungs(inf_model, volume.array, lungs, volume.spacing, progress=_stage(progress, "infection"))
    else:
        infection, prob = inf_model.predict(volume.array, lungs, volume.spacing, progress=_stage(progress, "infection"))
    infection = np.where(lungs > 0, infection, 0).astype(np.uint8)  # guaranteed, whatever the model does
    prob = np.where(lungs > 0, prob, 0).astype(np.float16)
    versions["infection"] = inf_model.version

    lobe_map = None
    if lobes and lobes_available():
        from covidtrack.segment.lobes import lobes_from_lung_mask

        emit(progress, "lobes", STAGES["lobes"][0], "splitting the lungs into lobes", item)
        lobe_version = modelstore.active("lobes").name
        lobe_map = np.asarray(lobes_from_lung_mask(lungs, volume.spacing, ct=volume.array), dtype=np.uint8)
        versions["lobes"] = lobe_version
    emit(progress, "lobes", 1.0, "segmentation done", item)
    return Segmentation(lungs=lungs, infection=infection, lobes=lobe_map, model_versions=versions, infection_prob=prob)

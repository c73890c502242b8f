"""Progress events shared by the pipeline, the CLI progress bar and the UI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One step of work.

    ``stage`` is a short machine name ("load", "lungs", "infection", "lobes", "metrics",
    "store", "register", ...); ``fraction`` is overall progress of the current item in
    [0, 1]; ``message`` is for people; ``item`` names the file or scan being processed.
    """

    stage: str
    fraction: float
    message: str = ""
    item: str = ""


ProgressCallback = Callable[[Progress], None]


def emit(callback: ProgressCallback | None, stage: str, fraction: float, message: str = "", item: str = "") -> None:
    """Send an event if someone listens."""
    if callback is not None:
        callback(Progress(stage=stage, fraction=min(1.0, max(0.0, fraction)), message=message, item=item))

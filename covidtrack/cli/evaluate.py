"""``python -m covidtrack evaluate WHAT``: accuracy against expert or synthetic truth."""

from __future__ import annotations

import argparse

from covidtrack.cli._dispatch import add_task_group

TASKS = {
    "slices": ("covidtrack.segment.eval_slices", "infection Dice on a MedSeg-layout folder of slices"),
    "phantoms": ("covidtrack.segment.eval_phantoms", "lungs / infection Dice and POI error on phantoms"),
    "fissures": ("covidtrack.segment.eval_fissures", "distance from hand-drawn fissures to lobe borders"),
}


def register(sub: argparse._SubParsersAction) -> None:
    add_task_group(sub, "evaluate", "evaluate segmentation accuracy", TASKS)

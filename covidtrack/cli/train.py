"""``python -m covidtrack train TASK``: seeded, reproducible training of a model version."""

from __future__ import annotations

import argparse

from covidtrack.cli._dispatch import add_task_group

TASKS = {
    "infection": ("covidtrack.segment.train_infection", "2D infection model (GGO / consolidation)"),
    "lungs": ("covidtrack.segment.train_lungs", "lung model (right / left)"),
    "lobes": ("covidtrack.segment.train_lobes", "lobe shape prior from real fissure masks"),
}


def register(sub: argparse._SubParsersAction) -> None:
    add_task_group(sub, "train", "train a model version", TASKS)

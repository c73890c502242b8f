"""Synthetic longitudinal chest CT phantoms with exact ground truth (tests, demo, training aid).

Public API:

- :func:`make_phantom` -- one healthy or sick scan with its :class:`Truth`;
- :func:`make_series` -- a patient followed over several scans, with true displacements;
- :func:`warp_to_baseline` -- pull a follow-up array into baseline space with a true displacement;
- :func:`write_demo_cohort` -- NIfTI files + ``manifest.csv`` for the demo;
- :class:`Truth`, :func:`volume_ml`, :data:`TISSUE_LABELS`.

Canonical orientation as in :mod:`covidtrack.volume` (right lung at low x, anterior at low y,
head at high z). Nothing here reads real data: everything is procedural and seeded.
"""

from covidtrack.phantom.cohort import DemoScan, read_manifest, write_demo_cohort
from covidtrack.phantom.motion import warp_to_baseline
from covidtrack.phantom.series import DEMO_SHAPE, DEMO_SPACING, make_phantom, make_series
from covidtrack.phantom.truth import TISSUE_IDS, TISSUE_LABELS, Truth, volume_ml

__all__ = [
    "DEMO_SHAPE",
    "DemoScan",
    "DEMO_SPACING",
    "TISSUE_IDS",
    "TISSUE_LABELS",
    "Truth",
    "make_phantom",
    "make_series",
    "read_manifest",
    "volume_ml",
    "warp_to_baseline",
    "write_demo_cohort",
]

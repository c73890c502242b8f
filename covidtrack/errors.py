"""Typed errors. Every message names the file and says what to do about it."""

from __future__ import annotations

from pathlib import Path


class CovidtrackError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(CovidtrackError):
    """Input that cannot become a trustworthy CT volume.

    ``str(err)`` reads: ``<path>: <problem>. Fix: <fix>``.
    """

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


class UnreadableFileError(InputError):
    """The file cannot be parsed at all (corrupt, truncated, wrong format)."""


class NoImageDataError(InputError):
    """A folder without any DICOM / image file, or an empty file."""


class NotCTError(InputError):
    """A series of another modality (MR, PT, SEG, ...)."""


class GeometryError(InputError):
    """2D image, too few slices, missing slices, non-uniform spacing, mixed orientation."""


class IntensityError(InputError):
    """Values that are not Hounsfield units (e.g. an 8-bit export)."""


class ModelError(CovidtrackError):
    """A model version is missing, corrupt or inconsistent with its card."""


class StoreError(CovidtrackError):
    """The DuckDB store refused an operation (schema mismatch, missing scan, ...)."""


class StoreBusyError(StoreError):
    """Another process holds the store's file (DuckDB allows one writer); waiting helps."""

"""Segmentation of lungs, lobes and infection.

``Segmentation`` is torch-free; ``segment`` and ``lobes_from_lung_mask`` are imported lazily so
that importing the types does not load torch.
"""

from __future__ import annotations

from typing import Any

from .types import Segmentation

__all__ = ["Segmentation", "segment", "lobes_from_lung_mask"]


def __getattr__(name: str) -> Any:
    if name == "segment":
        from .api import segment

        return segment
    if name == "lobes_from_lung_mask":
        from .lobes import lobes_from_lung_mask

        return lobes_from_lung_mask
    raise AttributeError(name)

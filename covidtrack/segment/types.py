"""The result of segmenting one Volume. Torch-free, so any stage can import it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Label maps on the volume's canonical grid (same shape as ``Volume.array``).

    - ``lungs``: uint8, 0 background, 1 right lung, 2 left lung;
    - ``infection``: uint8, 0 none, 1 GGO, 2 consolidation (only inside the lungs);
    - ``lobes``: uint8, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL, or ``None`` when not computed;
    - ``model_versions``: which model produced what, e.g. ``{"lungs": "lungs/v1",
      "infection": "infection/v1", "lobes": "lobes/v1"}``;
    - ``infection_prob``: optional float16 probability of infection, for review and active
      learning (not stored by default).
    """

    lungs: np.ndarray
    infection: np.ndarray
    lobes: np.ndarray | None = None
    model_versions: dict[str, str] = field(default_factory=dict)
    infection_prob: np.ndarray | None = None

    def __post_init__(self) -> None:
        shapes = {self.lungs.shape, self.infection.shape}
        if self.lobes is not None:
            shapes.add(self.lobes.shape)
        if len(shapes) != 1:
            raise ValueError(f"label maps must share one shape, got {shapes}")
        for name in ("lungs", "infection", "lobes"):
            arr = getattr(self, name)
            if arr is not None and arr.dtype != np.uint8:
                raise ValueError(f"{name} must be uint8, got {arr.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lungs.shape

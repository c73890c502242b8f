"""Reading and writing ``weights.pt`` for every network covidtrack ships.

One file layout for all tasks: ``{"format": <task format tag>, "net": <spec JSON>, "state_dict":
<float16 tensors>}``. Float16 halves the file with no measurable change in Dice; tensors are
restored to float32 on load. The format tag stops one task's weights loading into another's net.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidtrack.errors import ModelError

if TYPE_CHECKING:
    import torch


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(network: "torch.nn.Module", spec_json: dict[str, Any], fmt: str, path: Path) -> str:
    """Write the weights file and return its sha256 (recorded in the model card)."""
    import torch

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in network.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": fmt, "net": spec_json, "state_dict": state}, path)
    return sha256_of(path)


def load(
    path: Path, fmt: str, what: str, build: Callable[[dict[str, Any]], "torch.nn.Module"], fix: str
) -> tuple["torch.nn.Module", dict[str, Any]]:
    """Read a weights file of format ``fmt``; ``build(spec_json)`` makes the empty network.

    Returns the float32 network in eval mode and its spec JSON. ``what`` ("an infection model")
    and ``fix`` (what to run when the file is missing) go into the error messages.
    """
    import torch

    if not path.exists():
        raise ModelError(f"{path}: weights missing; reinstall the model version or {fix}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ModelError(f"{path}: cannot read weights ({err}); the file is corrupt, retrain or restore it") from err
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else "?"
        raise ModelError(f"{path}: not {what} (format {found})")
    net = build(blob["net"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    net.eval()
    return net, blob["net"]

"""Model versions on disk: shipped (read-only, ``data/models``) and user-trained (``$COVIDTRACK_HOME/models``).

Layout: ``<root>/<task>/<version>/`` holding ``weights.pt`` and ``card.json`` (+ ``MODEL_CARD.md``).
A version folder is immutable once written. The active version per task is a small JSON pointer
``$COVIDTRACK_HOME/models/active.json``; without it, the newest shipped version is active.
Switching is an atomic file replace, so a crash never leaves a half-written pointer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from covidtrack.config import SHIPPED_MODELS, settings
from covidtrack.errors import InputError, ModelError


@dataclass(frozen=True)
class ModelRef:
    task: str  # "lungs", "infection", "lobes", ...
    version: str  # "v1", "v2", ...
    path: Path  # the version folder
    shipped: bool

    @property
    def name(self) -> str:
        """``task/version``: how metrics rows and cards refer to the model."""
        return f"{self.task}/{self.version}"

    @property
    def weights(self) -> Path:
        return self.path / "weights.pt"

    def card(self) -> dict:
        card = self.path / "card.json"
        if not card.exists():
            raise ModelError(f"{card}: model card missing; every model version needs card.json")
        return json.loads(card.read_text())


def _version_key(version: str) -> tuple[int, str]:
    m = re.fullmatch(r"v(\d+)", version)
    return (int(m.group(1)) if m else -1, version)


def list_versions(task: str) -> list[ModelRef]:
    """All versions of a task, shipped first, each group in version order."""
    refs: list[ModelRef] = []
    for root, shipped in ((SHIPPED_MODELS, True), (settings().models_dir, False)):
        folder = root / task
        if folder.is_dir():
            for p in sorted(folder.iterdir(), key=lambda p: _version_key(p.name)):
                # ".v4.x1y2" folders are a publish in progress (or killed mid-way): never a version
                if p.is_dir() and _VERSION_NAME.match(p.name) and (p / "card.json").exists():
                    refs.append(ModelRef(task=task, version=p.name, path=p, shipped=shipped))
    return refs


def get(task: str, version: str) -> ModelRef:
    for ref in list_versions(task):
        if ref.version == version:
            return ref
    raise ModelError(f"model {task}/{version} not found under {SHIPPED_MODELS} or {settings().models_dir}")


def _pointer() -> Path:
    return settings().models_dir / "active.json"


def _read_pointer() -> dict:
    p = _pointer()
    return json.loads(p.read_text()) if p.exists() else {}


def active(task: str) -> ModelRef:
    """The active version of a task (pointer file, else the newest shipped version)."""
    chosen = _read_pointer().get(task, {}).get("active")
    if chosen:
        return get(task, chosen)
    shipped = [r for r in list_versions(task) if r.shipped]
    if not shipped:
        raise ModelError(
            f"{SHIPPED_MODELS / task}: no shipped model for task '{task}'; "
            f"train one with `python -m covidtrack train {task}`"
        )
    return shipped[-1]


_POINTER_LOCK = threading.Lock()  # dashboard sessions are threads of one process


@contextlib.contextmanager
def _pointer_update() -> Iterator[None]:
    """Serialise read-change-write of the pointer across threads and processes (a promotion and a
    rollback at the same moment must not lose one of them; the replace alone is atomic)."""
    lock_path = settings().models_dir / "active.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _POINTER_LOCK, open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def set_active(task: str, version: str) -> ModelRef:
    """Make ``version`` active, remembering the previous one for :func:`rollback`."""
    with _pointer_update():
        return _set_active(task, version)


def _set_active(task: str, version: str) -> ModelRef:
    ref = get(task, version)
    pointer = _read_pointer()
    try:
        previous = active(task).version if list_versions(task) else None
    except ModelError:  # no pointer and nothing shipped (e.g. only user-trained versions): no previous
        previous = None
    history = pointer.get(task, {}).get("history", [])
    if previous and previous != version:
        history = [*history, previous]
    pointer[task] = {"active": version, "history": history}
    _write_pointer(pointer)
    return ref


def rollback(task: str) -> ModelRef:
    """Re-activate the version that was active before the last promotion."""
    with _pointer_update():
        return _rollback(task)


def _rollback(task: str) -> ModelRef:
    pointer = _read_pointer()
    history = pointer.get(task, {}).get("history", [])
    if not history:
        raise ModelError(f"{_pointer()}: no earlier active version of '{task}' to roll back to")
    previous = history[-1]
    pointer[task] = {"active": previous, "history": history[:-1]}
    _write_pointer(pointer)
    return get(task, previous)


_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")


def check_new_version(task: str, version: str) -> str:
    """``version`` if a training run may create it: a plain name (no path), used by no shipped or
    user version of ``task`` (a second "v3" could never be reached: lookups find the shipped one)."""
    if not _VERSION_NAME.match(version) or set(version) <= {"."}:
        raise InputError("--version", f"{version!r} is not a version name",
                         "use letters, digits, '.', '_' or '-', e.g. v4 (no folders)")
    if any(r.version == version for r in list_versions(task)):
        raise InputError("--version", f"{task}/{version} exists already and versions are immutable",
                         f"pick another --version (the next free one is {next_version(task)}) or leave it out")
    return version


def next_version(task: str) -> str:
    nums = [_version_key(r.version)[0] for r in list_versions(task)]
    return f"v{max(nums, default=0) + 1}"


def _write_pointer(data: dict) -> None:
    path = _pointer()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".active.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)

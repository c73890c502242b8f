"""Settings from environment variables with documented defaults.

Everything the product writes lives under one folder, ``COVIDTRACK_HOME``
(default ``./covidtrack-data``, git-ignored). Shipped model weights live in the
repository under ``data/models`` and are read-only at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "data" / "models"
SAMPLES = REPO_ROOT / "data" / "samples"


DEFAULT_SALT = "covidtrack-default-salt"  # public: keys made with it can be reversed by trying IDs

DEFAULT_SALT_WARNING = (
    "COVIDTRACK_SALT is not set, so patient keys use the public default salt: anyone with the store can "
    "recover short numeric patient IDs by trying them all. Set COVIDTRACK_SALT to a secret of your site "
    "BEFORE the first ingest (changing it later gives the same patient a new key)."
)


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :func:`settings` so env vars are read once per call."""

    home: Path
    threads: int
    salt: str

    @property
    def salt_is_default(self) -> bool:
        return self.salt == DEFAULT_SALT

    @property
    def db_path(self) -> Path:
        return self.home / "covidtrack.duckdb"

    @property
    def masks_dir(self) -> Path:
        return self.home / "masks"

    @property
    def registrations_dir(self) -> Path:
        return self.home / "registrations"

    @property
    def models_dir(self) -> Path:
        """Model versions trained by users (HITL); shipped ones are in SHIPPED_MODELS."""
        return self.home / "models"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def work_dir(self) -> Path:
        """Scratch space the product manages (cleaned by the code that uses it)."""
        return self.home / "work"


def settings() -> Settings:
    """Read settings from the environment.

    - ``COVIDTRACK_HOME``: data folder (default ``./covidtrack-data``).
    - ``COVIDTRACK_THREADS``: CPU threads for torch/ITK/ANTs (default: all cores).
    - ``COVIDTRACK_SALT``: salt for the pseudonymous patient key. Set it per site and keep
      it secret; the default only guarantees that raw IDs never reach the store.
    """
    from covidtrack.errors import InputError

    home = Path(os.environ.get("COVIDTRACK_HOME", "covidtrack-data")).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise InputError(home, "COVIDTRACK_HOME names a file, not a folder",
                         "point COVIDTRACK_HOME at a folder (it is created when missing)")
    raw_threads = os.environ.get("COVIDTRACK_THREADS", "").strip() or str(os.cpu_count() or 1)
    try:
        threads = int(raw_threads)
    except ValueError:
        raise InputError("COVIDTRACK_THREADS", f"{raw_threads!r} is not a whole number",
                         "set COVIDTRACK_THREADS to a number of CPU threads, e.g. 2, or unset it for all cores") from None
    salt = os.environ.get("COVIDTRACK_SALT", DEFAULT_SALT)
    return Settings(home=home, threads=max(1, threads), salt=salt)

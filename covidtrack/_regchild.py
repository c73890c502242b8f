"""Child process of :func:`covidtrack.longitudinal._compute_in_child`: one registration's ANTs
part, run apart from the dashboard's server (ANTsPy holds Python's interpreter lock).

``python -m covidtrack._regchild FOLDER`` reads ``FOLDER/args.pkl`` (written by the parent, a
trusted temporary folder) and writes the change table to ``FOLDER/table.pkl``.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(folder: str) -> int:
    from covidtrack.longitudinal import _compute_pair

    job = Path(folder)
    args = pickle.loads((job / "args.pkl").read_bytes())
    table = _compute_pair(*args)
    (job / "table.pkl").write_bytes(pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""covidtrack command line: python -m covidtrack COMMAND ... (COMMAND --help for each).

Each module in :mod:`covidtrack.cli` adds its commands through ``register(subparsers)``;
this file only discovers them, so the CLI stays a thin layer over the library.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from covidtrack import cli
from covidtrack.errors import CovidtrackError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m covidtrack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue  # helpers, not commands
        module = importlib.import_module(f"covidtrack.cli.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CovidtrackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user named cannot be written or read: say which, no traceback
        where = err.filename or "a file"
        print(f"error: {where}: {err.strerror or err}. Fix: check the path, that its folder exists and that "
              "you may write there", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

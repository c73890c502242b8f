"""Shared helper for commands with sub-tasks (``train TASK``, ``evaluate WHAT``).

Each task module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy
imports (torch, ants) inside ``run``, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib


def add_task_group(sub: argparse._SubParsersAction, name: str, help_text: str, tasks: dict[str, tuple[str, str]]) -> None:
    parser = sub.add_parser(name, help=help_text)
    group = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, (module_name, task_help) in tasks.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # task not part of this installation
        task_parser = group.add_parser(task, help=task_help)
        module.add_arguments(task_parser)
        task_parser.set_defaults(func=module.run)

"""CLI command modules. Each defines ``register(subparsers)`` and sets ``func`` on its parsers.

Keep heavy imports (torch, ants, streamlit) inside the command functions so ``--help`` is fast.
"""

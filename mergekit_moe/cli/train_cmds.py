"""CLI commands for train: per-task LoRA experts."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""

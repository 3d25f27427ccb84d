"""CLI commands for Med-MoE-LoRA checkpoints: inspect, generate, export-peft, export-merged."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""

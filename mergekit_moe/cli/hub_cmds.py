"""CLI commands for Hugging Face Hub: push, pull, search."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""

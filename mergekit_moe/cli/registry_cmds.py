"""CLI commands for local registry and bundles: import, list, info, verify, remove, export."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""

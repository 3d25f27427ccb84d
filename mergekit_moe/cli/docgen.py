"""Generate docs/cli.md from the click commands themselves (a test checks the file is current).

    python -m mergekit_moe.cli.docgen > docs/cli.md
"""

from __future__ import annotations

import click

HEADER = """# CLI reference

Generated from `moemerge --help` by `python -m mergekit_moe.cli.docgen > docs/cli.md`;
`tests/test_docs_cli.py` fails when this file and the commands disagree.

Every command prints errors as one line (`error: what (where) (how to fix)`) and exits 1, or 2 for
usage errors; `moemerge --debug CMD ...` shows the traceback instead. Progress goes to stderr,
results (tables, completions) to stdout.
"""


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=100, max_content_width=100)
    return cmd.get_help(ctx)


def render() -> str:
    from . import cli

    root = click.Context(cli, info_name="moemerge", terminal_width=100, max_content_width=100)
    parts = [HEADER, "## moemerge\n", "```text", cli.get_help(root), "```\n"]
    for name in sorted(cli.commands):
        cmd = cli.commands[name]
        parts += [f"## moemerge {name}\n", "```text", _help(cmd, name, root), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    click.echo(render(), nl=False)

"""docs/cli.md is generated from the commands; it must match them, and every command needs a summary."""

from pathlib import Path

from mergekit_moe.cli import cli
from mergekit_moe.cli.docgen import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == render(), "regenerate: python -m mergekit_moe.cli.docgen > docs/cli.md"


def test_every_command_has_a_one_line_summary():
    for name, cmd in cli.commands.items():
        summary = cmd.get_short_help_str(limit=100)
        assert summary and len(summary) > 10, name

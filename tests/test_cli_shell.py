"""The CLI shell: help, version, one-line errors, exit codes."""

from helpers import run_cli

from mergekit_moe import __version__


def test_help_lists_commands_with_summaries():
    proc = run_cli("--help", check=True)
    assert "Commands:" in proc.stdout or "Options:" in proc.stdout
    assert "--debug" in proc.stdout


def test_version():
    proc = run_cli("--version", check=True)
    assert __version__ in proc.stdout


def test_unknown_command_is_usage_error_exit_2():
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr

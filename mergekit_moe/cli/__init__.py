"""The ``moemerge`` command line: the only place that prints or exits.

Each area registers its commands from its own module (``registry_cmds``, ``train_cmds``,
``moe_cmds``, ``compose_cmds``, ``hub_cmds``, ``eval_cmds``). Heavy libraries (torch,
transformers) are imported inside the commands so ``moemerge --help`` stays fast.

Errors: a ``MoeMergeError`` prints one line ``error: ...`` and exits 1 (2 for usage errors);
``--debug`` prints the traceback instead.
"""

from __future__ import annotations

import os
import sys
import traceback

import click
from rich.markup import escape

from .. import __version__
from ..errors import MoeMergeError, UsageError
from . import base_cmds, compose_cmds, eval_cmds, hub_cmds, moe_cmds, registry_cmds, train_cmds
from ._console import err_console

_STATE = {"debug": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="moemerge")
@click.option("--debug", is_flag=True, envvar="MOEMERGE_DEBUG", help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """moemerge: train LoRA experts, compose them into a Med-MoE-LoRA model, share them on the Hub."""
    _STATE["debug"] = debug or _STATE["debug"]
    from ._console import quiet_libraries

    quiet_libraries()


for _module in (registry_cmds, train_cmds, moe_cmds, compose_cmds, hub_cmds, eval_cmds, base_cmds):
    _module.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _STATE["debug"] = "--debug" in args or os.environ.get("MOEMERGE_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name="moemerge", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:  # usage errors: bad options, missing arguments
        e.show()
        sys.exit(e.exit_code)
    except MoeMergeError as e:
        if _STATE["debug"]:
            traceback.print_exc()
        # escape: messages name tensors as "[base_model.model...]", which rich would eat as markup
        err_console.print(f"[bold red]error:[/] {escape(e.one_line())}", highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # a bug or an unexpected library error: still one line unless --debug
        if _STATE["debug"]:
            traceback.print_exc()
        msg = str(e).strip().split("\n")[0]
        err_console.print(f"[bold red]error:[/] unexpected {type(e).__name__}: {escape(msg)} (run with --debug for the traceback)",
                          highlight=False, soft_wrap=True, markup=True)
        sys.exit(1)

"""CLI commands for the Hugging Face Hub: push, pull, search.

Tokens follow huggingface_hub (``HF_TOKEN``, then ``hf auth login``); ``--endpoint`` or
``HF_ENDPOINT`` selects a self-hosted Hub.
"""

from __future__ import annotations

import click

from ._console import kv_table as _kv

_ENDPOINT = click.option("--endpoint", envvar="HF_ENDPOINT", metavar="URL",
                         help="Hub endpoint (default: $HF_ENDPOINT or https://huggingface.co).")


@click.command("push")
@click.argument("source", metavar="NAME|PATH")
@click.argument("repo_id", metavar="ORG/REPO")
@click.option("--private", is_flag=True, help="Create the repo as private (when it does not exist yet).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created if missing). Default: main.")
@click.option("--message", "-m", metavar="TEXT", help="Commit message.")
@click.option("--subfolder", default="", metavar="PATH", help="Folder inside the repo (several experts per repo).")
@_ENDPOINT
def push_cmd(source, repo_id, private, revision, message, subfolder, endpoint) -> None:
    """Publish an expert bundle (registry NAME[@VERSION] or directory) or a composed checkpoint.

    The bundle is verified and its file types checked before any request is sent. Everything
    goes in one commit with a refreshed model card; pushing unchanged content makes no commit.

    \b
    Example:
      moemerge push diag medorg/diag-expert --subfolder v1
    """
    from ..hub import push
    from ._console import RichReporter, out_console

    with RichReporter() as rep:
        res = push(source, repo_id, private=private, revision=revision, message=message, subfolder=subfolder,
                   endpoint=endpoint, reporter=rep)
    status = "[green]new commit[/]" if res.changed else "[yellow]unchanged (no new commit)[/]"
    out_console.print(_kv(f"Pushed {res.kind}", [("repo", res.repo_id), ("revision", res.revision),
                                                 ("subfolder", res.subfolder or "-"), ("files", str(len(res.files))),
                                                 ("status", status), ("url", res.url), ("commit", res.commit)]))


@click.command("pull")
@click.argument("ref", metavar="ORG/REPO[@REV][:SUBFOLDER]")
@click.option("--name", help="Register under this name (default: the bundle's own name, or the repo name).")
@click.option("--base", metavar="MODEL", help="Check the expert's base fingerprint against this base model.")
@click.option("--task", help="Task for a plain PEFT adapter that has no expert.json (default: from its card).")
@_ENDPOINT
def pull_cmd(ref, name, base, task, endpoint) -> None:
    """Download an expert from the Hub, verify every file, and register it pinned to the commit SHA.

    Pickle and code files are refused before anything is downloaded. A plain PEFT LoRA repo
    without expert.json is accepted and marked as unverified provenance.

    \b
    Example:
      moemerge pull medorg/diag-expert@main:v1 --base ./base-model
    """
    from ..hub import pull
    from ._console import RichReporter, out_console

    with RichReporter() as rep:
        res = pull(ref, name=name, base=base, task=task, endpoint=endpoint, reporter=rep)
    e = res.entry
    prov = "[green]verified against expert.json[/]" if res.verified else "[yellow]unverified (no expert.json)[/]"
    out_console.print(_kv("Already registered" if res.already else "Pulled expert",
                          [("expert", f"[bold]{e.name}@{e.version}[/]"), ("task", e.task),
                           ("digest", f"sha256:{e.digest}"), ("source", str(e.provenance.get("source", ref))),
                           ("commit", res.commit), ("provenance", prov), ("stored at", str(e.path))]))


@click.command("search")
@click.argument("query", required=False)
@click.option("--task", help="Only experts for this task.")
@click.option("--base", metavar="HUB_ID", help="Only experts for this base model (Hub id).")
@click.option("--all-lora", is_flag=True, help="Also list PEFT LoRA repos that are not moemerge bundles.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000), help="Most rows to show.")
@_ENDPOINT
def search_cmd(query, task, base, all_lora, limit, endpoint) -> None:
    """Search the Hub for moemerge experts (most downloaded first)."""
    from ..hub import search
    from ._console import out_console, table

    hits = search(query, task=task, base=base, all_lora=all_lora, limit=limit, endpoint=endpoint)
    if not hits:
        out_console.print("[dim]no matching repos[/]")
        return
    out_console.print(table(f"{len(hits)} repo{'s' if len(hits) != 1 else ''}", ["repo", "task", "base", "downloads", "last update"],
                            [(h.repo_id, h.task or "-", h.base or "-", h.downloads, h.last_modified) for h in hits]))


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    for cmd in (push_cmd, pull_cmd, search_cmd):
        group.add_command(cmd)

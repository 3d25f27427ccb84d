"""CLI commands for the local registry and bundles: import, list, info, verify, remove, export."""

from __future__ import annotations

import re
from pathlib import Path

import click
from rich.markup import escape as esc  # user-supplied names/tags/paths must not be read as markup

from ._console import kv_table as _kv_table

_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def _registry():
    from ..registry import Registry  # lazy: keeps `moemerge --help` fast

    return Registry()


def _provenance_text(prov: dict) -> str:
    """One short, honest line: where the expert came from and whether that was verified."""
    if not prov:
        return "[dim]unknown[/]"
    src = str(prov.get("source", "?"))
    if prov.get("commit"):
        src += f"@{str(prov['commit'])[:10]}"
    src = esc(src)
    mark = "[green]verified[/]" if prov.get("verified") is True else "[yellow]unverified[/]"
    return f"{src} ({mark})"


def _fmt(v) -> str:
    """A value as escaped rich text."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return esc(", ".join(map(str, v)))
    return esc(str(v))


def _adapter_summary(bundle) -> list[tuple[str, str]]:
    from ..lora import read_adapter_config

    cfg = read_adapter_config(bundle.path)
    targets = cfg.get("target_modules")
    return [("peft type", _fmt(f"{cfg.get('peft_type', 'LORA')} ({cfg.get('task_type', '?')})")),
            ("rank r / alpha", _fmt(f"{cfg.get('r')} / {cfg.get('lora_alpha')}") + ("  (rsLoRA)" if cfg.get("use_rslora") else "")),
            ("rank pattern", _fmt(cfg.get("rank_pattern")) if cfg.get("rank_pattern") else "-"),
            ("target modules", _fmt(sorted(targets)) if isinstance(targets, (list, tuple)) else _fmt(targets))]


def _print_import(entry, bundle) -> None:
    from ._console import human_size, out_console

    rows = [("expert", f"[bold]{esc(entry.ref)}[/]"), ("task", _fmt(entry.task)), ("digest", f"sha256:{entry.digest}"),
            ("base model", _fmt(entry.base_model) or "[yellow]unknown[/]"),
            ("base fingerprint", entry.base_fingerprint[:16] if entry.base_fingerprint else "[yellow]unknown (not validated)[/]")]
    rows += _adapter_summary(bundle)
    rows += [("files", _fmt(", ".join(f"{k} ({human_size(v['size'])})" for k, v in sorted(bundle.files.items())))),
             ("stored at", _fmt(entry.path))]
    out_console.print(_kv_table("Imported expert", rows))
    out_console.print(f"[green]✓[/] use it as [bold]{esc(entry.ref)}[/] (or sha256:{entry.digest[:12]}) in a recipe; "
                      f"`moemerge info {esc(entry.name)}` shows details")


@click.command("import", short_help="Import a PEFT LoRA adapter (or a bundle) into the registry.")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--name", help="Expert name in the registry (letters, digits, . _ -). Required for a plain PEFT adapter.")
@click.option("--task", help="Task the expert was trained for, e.g. diagnosis. Required for a plain PEFT adapter.")
@click.option("--base", "base", metavar="MODEL", help="Base model (dir, .gguf, cached Hub id) to validate against. Default: the adapter config's base.")
@click.option("--version", "version", help="Version label. Default: 1, or the next number if NAME exists with other content.")
@click.option("--description", default="", help="One-line description for the model card.")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option("--license", "license_", default="apache-2.0", show_default=True, help="License id for the model card.")
@click.option("--convert-pickle", is_flag=True,
              help="Convert a .bin/.pt adapter to safetensors (read with torch.load(weights_only=True)). Only for files you trust.")
def import_cmd(path, name, task, base, version, description, tags, license_, convert_pickle) -> None:
    """Import a PEFT LoRA adapter directory (or an expert bundle) into the local registry.

    The adapter is checked (safetensors only, no NaN/Inf, ranks match the config), validated
    against its base model when available locally (every tensor maps to a module of the right
    shape), hashed, and copied into the content-addressed store.

    \b
    Example:
      moemerge import ./my-lora --name diag --task diagnosis --base ./base-model
    """
    from ._console import RichReporter

    reg = _registry()
    with RichReporter() as rep:
        entry = reg.import_adapter(path, name=name, task=task, base=base, version=version, convert_pickle=convert_pickle,
                                   reporter=rep, description=description, tags=list(tags), license=license_)
    _print_import(entry, reg.bundle(f"sha256:{entry.digest}"))


@click.command("list", short_help="List the experts in the local registry.")
@click.option("--task", help="Only experts for this task.")
@click.option("--base", "base", metavar="MODEL", help="Only experts for this base (a model reference, its base_model string, or a fingerprint).")
@click.option("--tag", help="Only experts with this tag.")
def list_cmd(task, base, tag) -> None:
    """List the experts in the local registry."""
    from ._console import out_console

    reg = _registry()
    entries = reg.find(task=task, tag=tag)
    if base:
        fps = {base} if _HEX.match(base) else set()
        if not fps:
            from ..base import fingerprint_of
            from ..errors import ModelLoadError

            try:
                fps.add(fingerprint_of(base))
            except ModelLoadError:
                pass  # not loadable here: match on the recorded base_model string only
        entries = [e for e in entries if e.base_model == base or any(e.base_fingerprint.startswith(f) for f in fps if f)]
    if not entries:
        out_console.print(f"[dim]no experts{' match these filters' if (task or base or tag) else ' yet'} in {esc(str(reg.home))}[/]")
        out_console.print("[dim]add one with `moemerge import PATH --name NAME --task TASK` or `moemerge pull`[/]")
        return
    from rich.table import Table

    t = Table(title=f"{len(entries)} expert{'s' if len(entries) != 1 else ''} in {esc(str(reg.home))}", title_justify="left", header_style="bold")
    for col, kw in (("name", {"no_wrap": True, "style": "bold"}), ("ver", {"no_wrap": True}), ("task", {}),
                    ("digest", {"no_wrap": True}), ("base", {"overflow": "fold"}), ("tags", {}), ("source", {"overflow": "fold"})):
        t.add_column(col, **kw)
    for e in entries:
        t.add_row(esc(e.name), esc(e.version), esc(e.task), e.digest[:12], esc(_short_base(e.base_model)), esc(", ".join(e.tags)) or "-",
                  _short_source(e.provenance))
    out_console.print(t)
    out_console.print("[dim]details: moemerge info NAME\\[@VERSION]; reference in recipes as NAME, NAME@VERSION or sha256:DIGEST[/]")


def _short_base(base_model: str) -> str:
    """Hub ids as is; local paths by their last component (the full path is in `info`)."""
    from ..modelcard import looks_like_hub_id

    if not base_model:
        return "?"
    return base_model if looks_like_hub_id(base_model) else Path(base_model).name or base_model


def _short_source(prov: dict) -> str:
    src = str(prov.get("source", "")) if prov else ""
    kind = src.split(":", 1)[0] if src else "unknown"
    if src.startswith("hf://"):
        kind = src[len("hf://"):]
    mark = "[green]verified[/]" if prov and prov.get("verified") is True else "[yellow]unverified[/]"
    return f"{kind} {mark}"


@click.command("info", short_help="Show an expert: metadata, files and hashes, provenance.")
@click.argument("ref", metavar="NAME|PATH")
def info_cmd(ref) -> None:
    """Show an expert: metadata, adapter config, files with hashes, metrics, provenance.

    NAME is `name`, `name@version` or `sha256:<prefix>`; PATH is a bundle directory.
    """
    from ..registry import open_bundle
    from ._console import human_size, out_console, table

    b = open_bundle(ref, _registry())
    m = b.meta
    rows = [("expert", f"[bold]{esc(m.name)}@{esc(m.version)}[/]"), ("task", _fmt(m.task)), ("description", _fmt(m.description) or "-"),
            ("tags", _fmt(m.tags) or "-"), ("license", _fmt(m.license)), ("base model", _fmt(m.base_model) or "-"),
            ("base fingerprint", _fmt(m.base_fingerprint) or "[yellow]unknown[/]"), ("digest", f"sha256:{b.digest}"),
            ("created", _fmt(m.created_at) or "-"), ("path", _fmt(b.path))]
    rows.append(("signature", _signature_text(b)))
    if m.data_fingerprint:
        rows.append(("data fingerprint", _fmt(m.data_fingerprint)))
    if m.datasets:
        rows.append(("datasets", _fmt(m.datasets)))
    out_console.print(_kv_table("Expert", rows))
    out_console.print(_kv_table("Adapter", _adapter_summary(b)))
    from rich.table import Table

    ft = Table(title="Files (sha256 from expert.json; `moemerge verify` re-checks them)", title_justify="left", header_style="bold")
    ft.add_column("file", no_wrap=True)
    ft.add_column("size", no_wrap=True, justify="right")
    ft.add_column("sha256", overflow="fold")
    for k, v in sorted(b.files.items()):
        ft.add_row(esc(k), human_size(v["size"]), esc(v["sha256"]))
    out_console.print(ft)
    if m.metrics:
        out_console.print(table("Metrics", ["metric", "value"], [(esc(k), _fmt(v)) for k, v in sorted(m.metrics.items())]))
    if m.hyperparameters:
        out_console.print(table("Hyperparameters", ["name", "value"], [(esc(k), _fmt(v)) for k, v in sorted(m.hyperparameters.items())]))
    prov = [("source", _provenance_text(m.provenance))]
    prov += [(esc(k), _fmt(v)) for k, v in sorted(m.provenance.items()) if k not in ("source", "verified")]
    out_console.print(_kv_table("Provenance", prov))


def _signature_text(b) -> str:
    from ..bundle import SIGNATURE
    from ..errors import MoeMergeError
    from ..signing import read_signature

    if not (b.path / SIGNATURE).exists():
        return "[dim]none[/]"
    try:
        doc = read_signature(b)
    except MoeMergeError as exc:
        return f"[red]unreadable[/] ({esc(exc.what)})"
    state = "[yellow]not checked[/]: moemerge verify NAME --key PUB.pem" if doc.get("digest") == b.digest else "[red]stale (other digest)[/]"
    return f"{esc(str(doc.get('algorithm')))}, key sha256:{esc(str(doc.get('public_key_sha256', ''))[:16])} ({state})"


@click.command("verify", short_help="Re-hash a bundle's files (and check its signature).")
@click.argument("ref", metavar="NAME|PATH")
@click.option("--key", "key", type=click.Path(exists=True, dir_okay=False), help="Also check the bundle's signature with this public key (PEM).")
def verify_cmd(ref, key) -> None:
    """Re-hash every file of a bundle against its expert.json (exit 1 naming the file on mismatch)."""
    from ..registry import open_bundle
    from ._console import out_console

    b = open_bundle(ref, _registry())
    b.verify()
    msg = f"[green]✓[/] {esc(b.meta.name)}@{esc(b.meta.version)}: {len(b.files)} files match expert.json (sha256:{b.digest[:12]})"
    if key:
        from ..signing import verify_signature

        doc = verify_signature(b, Path(key))
        msg += f"; signature verified ({esc(str(doc.get('algorithm')))}, key sha256:{esc(str(doc.get('public_key_sha256', ''))[:16])})"
    out_console.print(msg)


@click.command("sign", short_help="Sign a bundle with a local private key.")
@click.argument("ref", metavar="NAME|PATH")
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Private key (PEM; EC P-256/P-384 or Ed25519). Password of an encrypted key: $MOEMERGE_KEY_PASSWORD.")
def sign_cmd(ref, key) -> None:
    """Sign a bundle's digest with a local private key (writes expert.sig next to expert.json).

    \b
    Make a key pair with openssl:
      openssl ecparam -genkey -name prime256v1 -noout -out key.pem
      openssl ec -in key.pem -pubout -out pub.pem
    Check it later with `moemerge verify NAME --key pub.pem`.
    """
    from ..registry import open_bundle
    from ..signing import sign_bundle
    from ._console import out_console

    b = open_bundle(ref, _registry())
    out = sign_bundle(b, Path(key))
    out_console.print(f"[green]✓[/] signed {esc(b.meta.name)}@{esc(b.meta.version)} (sha256:{b.digest[:12]}) -> {esc(str(out))}")


@click.command("remove", short_help="Remove an expert from the local registry.")
@click.argument("ref", metavar="NAME")
def remove_cmd(ref) -> None:
    """Remove an expert from the local registry (NAME: `name`, `name@version` or `sha256:<prefix>`)."""
    from ._console import out_console

    e = _registry().remove(ref)
    out_console.print(f"removed {esc(e.ref)} (sha256:{e.digest[:12]})")


@click.command("export", short_help="Write an expert as a plain PEFT adapter directory.")
@click.argument("ref", metavar="NAME")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
def export_cmd(ref, out_dir, overwrite) -> None:
    """Write an expert as a plain PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from ..errors import UsageError
    from ..registry import open_bundle
    from ._console import out_console

    b = open_bundle(ref, _registry())
    b.verify()
    if Path(out_dir).exists() and not overwrite:
        raise UsageError(f"{out_dir} already exists", hint="pass --overwrite or choose another directory")
    out = b.export(out_dir, overwrite=overwrite)
    out_console.print(f"[green]✓[/] exported {esc(b.meta.name)}@{esc(b.meta.version)} to {esc(str(out))} "
                      f"(load with PeftModel.from_pretrained(base, {esc(repr(str(out)))}))")


@click.command("gc", short_help="Delete leftovers of interrupted imports from the registry.")
def gc_cmd() -> None:
    """Delete staging directories and unindexed store directories left by interrupted imports.

    They are already invisible to every command; this only frees the disk space.
    """
    from ._console import out_console

    junk = _registry().gc()
    out_console.print(f"removed {len(junk)} leftover{'s' if len(junk) != 1 else ''}" if junk else "nothing to clean")


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    for cmd in (import_cmd, list_cmd, info_cmd, verify_cmd, sign_cmd, remove_cmd, export_cmd, gc_cmd):
        group.add_command(cmd)

"""CLI commands ``moemerge compose RECIPE`` and ``moemerge validate RECIPE``."""

from __future__ import annotations

import click

from ._console import err_console, layer_ranges, out_console, table
from ._console import fmt_value as _fmt

_METHODS = ["moe", "linear", "ties", "dare_ties", "topk", "uniform"]


def _plan_table(plan) -> None:
    rows = [[r.name, r.role, r.spec.source or "train:", "train pending" if r.needs_training else str(r.adapter_dir),
             "/".join(map(str, sorted(set(r.ranks.values())))) or "-", (r.fingerprint or "-")[:12]]
            for r in plan.experts + ([plan.knowledge] if plan.knowledge else [])]
    if plan.knowledge_null:
        rows.append(["null", "knowledge", "the base model itself", "-", "0", plan.base_fingerprint[:12]])
    out_console.print(table(f"experts (base fingerprint {plan.base_fingerprint[:12]})",
                            ["expert", "role", "source", "adapter", "rank", "base fp"], rows))
    slots = ", ".join(f"layers {layers}: {n}" for layers, n in layer_ranges(enumerate(plan.slots)))
    out_console.print(f"method {plan.method}; task slots: {slots} (merge: {plan.merge_method})", highlight=False)


def _install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: the staging directory is removed, no output is left."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not in the main thread (e.g. CliRunner in a worker): keep the default
        pass


@click.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--schema-only", is_flag=True, help="Only check the YAML schema; do not resolve experts or read the base.")
@click.option("--method", type=click.Choice(_METHODS), help="Check for this method instead of the recipe's.")
@click.option("--allow-base-mismatch", is_flag=True, help="Accept experts whose base fingerprint differs from the base.")
def validate_cmd(recipe, schema_only, method, allow_base_mismatch) -> None:
    """Check a compose recipe without running it: schema, sources, base fingerprints, shapes, data files.

    Every schema problem is listed at once with its key path; nothing is written.
    """
    from ..compose import plan_compose
    from ..recipe import load_recipe

    r = load_recipe(recipe)
    for note in r.defaults_used:
        err_console.print(f"[cyan]•[/] default: {note}", highlight=False)
    if schema_only:
        out_console.print(f"recipe OK (schema): {len(r.experts)} expert(s), output {r.output.path}", highlight=False)
        return
    plan = plan_compose(r, method=method, allow_base_mismatch=allow_base_mismatch, overwrite=True, recipe_path=recipe)
    _plan_table(plan)
    out_console.print(f"recipe OK: ready to compose into {plan.output}", highlight=False)


@click.command("compose")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(_METHODS),
              help="Build a baseline from the same recipe: linear/ties/dare_ties (one merged LoRA), topk (hard routing), "
                   "uniform (no calibration). Default: the recipe's `method` (moe).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (overrides output.path).")
@click.option("--force", is_flag=True, help="Replace an existing output directory (atomically, at the end).")
@click.option("--allow-base-mismatch", is_flag=True, help="Compose experts whose base fingerprint differs from the base.")
@click.option("--update", "update_lock", is_flag=True, help="Re-resolve hf:// experts and rewrite RECIPE.lock.json.")
def compose_cmd(recipe, method, out_dir, force, allow_base_mismatch, update_lock) -> None:
    """Compose LoRA experts into a Med-MoE-LoRA checkpoint from a YAML recipe.

    Stages: check (no weights) -> train inline experts -> allocate + merge -> router init -> calibrate -> write.
    The output appears only when complete; an interrupted compose leaves none.
    """
    from pathlib import Path

    from ..compose import plan_compose, run_compose
    from ..recipe import load_recipe
    from ._console import RichReporter

    _install_sigterm()
    r = load_recipe(recipe)
    if out_dir:
        r.output.path = str(Path(out_dir).resolve())
    with RichReporter() as rep:
        plan = plan_compose(r, method=method, allow_base_mismatch=allow_base_mismatch, overwrite=force or None, reporter=rep,
                            recipe_path=recipe, update_lock=update_lock)
        result = run_compose(plan, reporter=rep, overwrite=force or None,
                             recipe_text=Path(recipe).read_text(encoding="utf-8"))
    out_console.print(table(f"allocation ({result.method})", ["layers", "task slots", "clusters"], layer_ranges(result.allocation)))
    if result.calibration:
        c = result.calibration
        rows = [[t, _fmt(c["routing_accuracy_before"].get(t)), _fmt(a)] for t, a in c["routing_accuracy_per_task"].items()]
        if c.get("general_to_knowledge_after") is not None:
            rows.append(["general -> knowledge", _fmt(c["general_to_knowledge_before"]), _fmt(c["general_to_knowledge_after"])])
        out_console.print(table("calibration: routing accuracy on held-out rows", ["task", "before", "after"], rows))
        out_console.print(f"KL to base on general data: {_fmt(c['kl_general_before'])} -> {_fmt(c['kl_general_after'])}; "
                          f"{c['steps']} steps in {_fmt(c['seconds'])} s; report: {result.output / 'calibration'}", highlight=False)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    out_console.print(f"wrote {result.output} ({stages})", highlight=False)


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    group.add_command(compose_cmd)
    group.add_command(validate_cmd)

"""CLI command ``moemerge train``: one LoRA expert from flags, or every ``train:`` expert of a recipe."""

from __future__ import annotations

import click

from ._console import err_console, out_console, table
from ._console import fmt_value as _fmt


def _results_table(results) -> None:
    rows = []
    for r in results:
        m = r.metrics or {}
        val = f"{_fmt(m.get('initial_val_loss'))} -> {_fmt(m.get('val_loss'))}" if m.get("val_loss") is not None else "-"
        rows.append([r.name, "skipped" if r.skipped else "trained", _fmt(m.get("steps")), _fmt(m.get("train_loss")), val,
                     _fmt(m.get("tokens_per_s")), _fmt(m.get("wall_time_s"))])
    out_console.print(table("training", ["expert", "status", "steps", "train loss", "val loss", "tok/s", "wall s"], rows))
    for r in results:
        where = f"{r.registry_ref} ({r.bundle_dir})" if r.registry_ref else str(r.bundle_dir)
        note = " (up to date: same base, data and hyperparameters)" if r.skipped else ""
        out_console.print(f"{r.name}: {where}{note}", highlight=False)
        if r.loss_curve and not r.skipped:
            out_console.print(f"{r.name}: loss curve {r.loss_curve}", highlight=False)


@click.command("train")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--base", "base", help="Base model: local directory, .gguf file, or a Hub id already in the HF cache.")
@click.option("--data", help="Task data: JSONL/JSON/CSV/Parquet file, or a directory with train/validation files.")
@click.option("--validation-data", help="Validation file (default: validation.* next to the data, else 10% carved out).")
@click.option("--name", help="Expert name in the registry.")
@click.option("--task", help="Task label (default: the name).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the training data [1].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate [2e-4].")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank r [8].")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="LoRA alpha [16].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), help="LoRA dropout [0.05].")
@click.option("--target-modules", help="Comma-separated module names (default: per-architecture projections).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch per micro-step [8].")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-steps per optimizer step [1].")
@click.option("--max-length", type=click.IntRange(min=8), help="Max tokens per example; longer rows are cut [256].")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1), help="Share of steps spent warming up [0.05].")
@click.option("--eval-every", type=click.IntRange(min=0), help="Steps between validation losses [50].")
@click.option("--save-every", type=click.IntRange(min=0), help="Steps between checkpoints (0: none) [50].")
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), help="Compute dtype [auto].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Also write the bundle here (must not exist).")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Checkpoint directory [$MOEMERGE_HOME/runs/NAME].")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint.")
@click.option("--force", is_flag=True, help="Resume even if base, data or hyperparameters changed.")
@click.option("--retrain", is_flag=True, help="Train even if the registry holds this expert with the same base, data and settings.")
@click.option("--only", help="Recipe mode: comma-separated expert names to train.")
def train_cmd(recipe, base, data, validation_data, name, task, max_steps, epochs, lr, rank, alpha, dropout, target_modules,
              batch_size, grad_accum, max_length, warmup_ratio, eval_every, save_every, seed, dtype, out_dir, run_dir,
              resume, force, retrain, only) -> None:
    """Train a LoRA expert and register it.

    \b
    moemerge train --base MODEL --data FILE --name NAME --task TASK [--max-steps N | --epochs N] ...
    moemerge train recipe.yaml        (every expert with a `train:` block; up-to-date ones are skipped)
    """
    from ..errors import UsageError
    from ..registry import Registry
    from ..train import TrainConfig, train_expert, train_recipe
    from ..train_loop import teardown_distributed
    from ._console import RichReporter

    overrides = {k: v for k, v in dict(validation_data=validation_data, task=task, max_steps=max_steps, epochs=epochs, lr=lr,
                                        rank=rank, alpha=alpha, dropout=dropout, batch_size=batch_size, grad_accum=grad_accum,
                                        max_length=max_length, warmup_ratio=warmup_ratio, eval_every=eval_every,
                                        save_every=save_every, seed=seed, dtype=dtype).items() if v is not None}
    if target_modules:
        overrides["target_modules"] = [t.strip() for t in target_modules.split(",") if t.strip()]
    import contextlib
    import os

    from ..progress import NullReporter

    registry = Registry()
    # under torchrun only rank 0 draws progress and prints results
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        with (RichReporter(err_console) if main_rank else contextlib.nullcontext(NullReporter())) as rep:
            if recipe:
                if base or data or name or overrides or out_dir or run_dir:
                    raise UsageError("with a recipe, training settings come from its `train:` blocks",
                                     hint="drop --base/--data/--name/... or train one expert without the recipe")
                from ..recipe import load_recipe

                results = train_recipe(load_recipe(recipe), registry=registry, reporter=rep, resume=resume, force=force,
                                       retrain=retrain, only=[s.strip() for s in only.split(",")] if only else None)
            else:
                missing = [f"--{k}" for k, v in (("base", base), ("data", data), ("name", name)) if not v]
                if missing:
                    raise UsageError(f"missing {', '.join(missing)}",
                                     hint="usage: moemerge train --base MODEL --data FILE --name NAME [--task TASK], or moemerge train recipe.yaml")
                if only:
                    raise UsageError("--only applies to recipe mode only")
                cfg = TrainConfig(data=data, **overrides)
                results = [train_expert(base, cfg, name=name, task=task, out_dir=out_dir, registry=registry,
                                        resume=resume, force=force, reporter=rep, run_dir=run_dir, skip_up_to_date=not retrain)]
    finally:
        teardown_distributed()
    if main_rank:
        _results_table(results)


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""
    group.add_command(train_cmd)

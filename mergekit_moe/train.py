"""Train one expert: a PEFT LoRA on one base model and one task dataset.

``TrainConfig`` is also the schema of a recipe's ``train:`` block (recipe.py validates keys
against ``dataclasses.fields(TrainConfig)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrainError
from .progress import Reporter, ensure

#: fields that only change how a run is observed or saved, not the adapter it produces
_NON_RESULT_FIELDS = frozenset({"eval_every", "save_every", "keep_checkpoints"})
#: fields that name data files; the data *fingerprint* (content hash) replaces them in comparisons
_DATA_FIELDS = frozenset({"data", "validation_data"})


@dataclass
class TrainConfig:
    """Hyperparameters of one expert's training run (also a recipe's ``train:`` block)."""

    data: str                                  # task data file (JSONL/JSON/CSV/Parquet) or a directory with train.jsonl
    validation_data: str | None = None         # explicit validation file; else carved out of ``data``
    task: str | None = None                    # task label (defaults to the expert's task)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None    # None: per-architecture defaults (arch.default_target_modules)
    use_rslora: bool = False
    max_steps: int | None = None               # optimizer steps; overrides ``epochs`` when set
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 8                        # global batch per optimizer micro-step (split across DDP ranks)
    grad_accum: int = 1
    max_length: int = 256                      # tokens per example (prompt + response); longer rows are cut
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50                       # optimizer steps between validation-loss evaluations (0: only at the end)
    save_every: int = 50                       # optimizer steps between checkpoints (0: never)
    keep_checkpoints: int = 2                  # complete checkpoints kept on disk
    val_fraction: float = 0.1                  # share of ``data`` held out when ``validation_data`` is not given
    dtype: str = "auto"                        # auto | float32 | bfloat16 (auto: bf16 on GPUs that support it, else fp32)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        problems = [f"{k} must be {want}" for k, ok, want in (
            ("rank", isinstance(self.rank, int) and self.rank >= 1, "an integer >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("grad_accum", isinstance(self.grad_accum, int) and self.grad_accum >= 1, "an integer >= 1"),
            ("max_length", isinstance(self.max_length, int) and self.max_length >= 8, "an integer >= 8"),
            ("max_steps", self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1), "an integer >= 1"),
            ("lr", isinstance(self.lr, (int, float)) and self.lr > 0, "> 0"),
            ("epochs", isinstance(self.epochs, (int, float)) and self.epochs > 0, "> 0"),
            ("dropout", isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "in [0, 1)"),
            ("val_fraction", isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("warmup_ratio", isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("dtype", self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"), "auto, float32 or bfloat16"),
        ) if not ok]
        if problems:
            raise TrainError(f"bad train settings: {'; '.join(problems)}", hint="see `moemerge train --help`")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that decide the trained adapter (what ``expert.json`` records and resume/skip compare)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NON_RESULT_FIELDS | _DATA_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown train setting(s): {', '.join(unknown)}", hint=f"known: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class TrainResult:
    """What a finished (or skipped) training run produced."""

    name: str
    bundle_dir: str | None                      # where the bundle was written (registry store or out_dir)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    skipped: bool = False                       # True when the registry already held an identical expert
    registry_ref: str | None = None
    loss_curve: str | None = None


# ----------------------------------------------------------------------------------- orchestration
def default_run_dir(name: str, registry=None) -> Path:
    """Where checkpoints and the final adapter of expert ``name`` live: ``<registry home>/runs/<name>``."""
    from .registry import default_home

    home = Path(registry.home) if registry is not None else default_home()
    return home / "runs" / name


def resolve_data(cfg: TrainConfig, root: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """(train file, explicit validation file or None). A directory gives ``train.*`` and, if present, ``validation.*``."""
    from .data import resolve_file, split_file

    def rel(p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() or root is None else Path(root) / q

    data = rel(cfg.data)
    train_file = resolve_file(data, "train")
    if cfg.validation_data:
        return train_file, resolve_file(rel(cfg.validation_data), "validation")
    return train_file, split_file(data, "validation") if data.is_dir() else None


def run_signature(base_fp: str, data_fp: str, cfg: TrainConfig) -> dict[str, Any]:
    """What must match for a resume (or a skip): base, data content, result-deciding hyperparameters."""
    return json.loads(json.dumps({"base_fingerprint": base_fp, "data_fingerprint": data_fp,
                                  "hyperparameters": cfg.hyperparameters()}))


def find_up_to_date(registry, name: str, signature: dict[str, Any]):
    """The registry entry of ``name`` trained with this exact base, data and hyperparameters, or None."""
    from .bundle import read_bundle

    for entry in reversed(registry.find(name=name, base_fingerprint=signature["base_fingerprint"])):
        meta = read_bundle(entry.path).meta
        if (meta.data_fingerprint == signature["data_fingerprint"]
                and json.loads(json.dumps(meta.hyperparameters)) == signature["hyperparameters"]):
            return entry
    return None


def make_lora_model(model, cfg: TrainConfig, model_type: str):
    """Wrap ``model`` with a fresh PEFT LoRA (targets default to the architecture's projections)."""
    from peft import LoraConfig, get_peft_model

    from .arch import arch_for, default_target_modules

    targets = list(cfg.target_modules) if cfg.target_modules else default_target_modules(model_type)
    if not targets:
        raise TrainError(f"no default LoRA target modules for model type {model_type!r}",
                         hint="pass target_modules (e.g. --target-modules q_proj,v_proj)")
    info = arch_for(model_type)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=bool(info and info.conv1d))
    import warnings

    try:
        with warnings.catch_warnings():  # transformers 5 deprecation noise from inside PEFT, not actionable here
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise TrainError(f"LoRA target modules {targets} do not fit {model_type!r}: {str(exc).splitlines()[0]}",
                         hint="check target_modules against the model's module names") from exc


def train_expert(base_ref: str | os.PathLike, cfg: TrainConfig, *, name: str, task: str | None = None,
                 out_dir: str | os.PathLike | None = None, registry=None, resume: bool = False, force: bool = False,
                 reporter: Reporter | None = None, run_dir: str | os.PathLike | None = None,
                 data_root: str | os.PathLike | None = None, description: str = "", tags: list[str] | None = None,
                 skip_up_to_date: bool = True) -> TrainResult:
    """Train one LoRA expert and write it as a bundle (``out_dir`` or ``<run_dir>/bundle``), registered if ``registry``.

    ``skip_up_to_date``: when ``registry`` already holds ``name`` trained on the same base, data and
    hyperparameters, return that entry (``skipped=True``, copied to ``out_dir`` if given) instead of training.

    ``resume``: continue from the newest complete checkpoint in ``run_dir`` (refused if the base, data or
    hyperparameters changed, unless ``force``). Runs under ``torchrun`` use DDP; rank 0 writes everything.
    """
    import numpy as np
    import torch

    from . import base as basemod
    from .data import data_fingerprint, load_rows, split_rows, tokenize_rows
    from .errors import DataError
    from .progress import NullReporter
    from .train_ckpt import clear_checkpoints, latest_checkpoint, list_checkpoints, signature_diff
    from .train_loop import barrier, pick_dtype, run_loop, setup_distributed

    dist = setup_distributed()
    rep = ensure(reporter) if dist.main else NullReporter()
    task = task or cfg.task or name
    if out_dir is not None and Path(out_dir).exists():
        raise TrainError("output directory already exists", where=str(out_dir), hint="choose another --out or remove it")
    train_file, val_file = resolve_data(cfg, data_root)
    train_rows = load_rows(train_file, task=task)
    if val_file is not None:
        val_rows = load_rows(val_file, task=task)
    else:
        train_rows, val_rows = split_rows(train_rows, cfg.val_fraction)
    data_fp = data_fingerprint([train_file, val_file])

    bref = basemod.resolve_base(base_ref)
    config = basemod.load_config(bref)
    tok = basemod.load_tokenizer(bref)
    signature = run_signature(basemod.base_fingerprint(config, tok), data_fp, cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(name, registry)
    if skip_up_to_date and registry is not None and not resume:
        entry = find_up_to_date(registry, name, signature)
        if entry is not None:
            rep.info(f"{name}: up to date ({entry.ref}: same base, data and hyperparameters), skipped")
            if out_dir is not None and dist.main:
                registry.bundle(entry.ref).export(out_dir)
            return TrainResult(name=name, bundle_dir=str(entry.path), skipped=True, data_fingerprint=data_fp,
                               registry_ref=entry.ref, metrics=dict(read_bundle_meta(entry.path).metrics))

    # one training process per run directory: two runs interleaving checkpoints would corrupt both
    lock = _lock_run_dir(run_dir) if dist.main else None
    try:
        resume_ck = None
        if resume:
            resume_ck = latest_checkpoint(run_dir)
            if resume_ck is None:
                rep.info(f"no complete checkpoint in {run_dir}: starting from scratch")
            else:
                diff = signature_diff(resume_ck.state.get("signature", {}), signature)
                if diff and not force:
                    raise TrainError(f"cannot resume: {', '.join(diff)} changed since the checkpoint", where=str(resume_ck.path),
                                     hint="rerun without --resume to start over, or pass --force to resume anyway")
                if diff:
                    rep.warn(f"resuming despite changed {', '.join(diff)} (--force)")
                rep.info(f"resuming from step {resume_ck.step} ({resume_ck.path})")
        elif list_checkpoints(run_dir) and dist.main:
            rep.info(f"starting over: removing checkpoints of an earlier run in {run_dir} (use --resume to continue it)")
            clear_checkpoints(run_dir)
        barrier(dist)

        train_set = tokenize_rows(train_rows, tok, cfg.max_length)
        val_set = tokenize_rows(val_rows, tok, cfg.max_length)
        cut = train_set.n_truncated + val_set.n_truncated
        if cut:
            dropped = train_set.n_dropped + val_set.n_dropped
            rep.warn(f"{cut} of {len(train_rows) + len(val_rows)} rows are longer than max_length={cfg.max_length} and were cut"
                     + (f"; {dropped} lost their whole answer and were dropped" if dropped else ""))
        if not train_set.examples:
            raise DataError("no training example has answer tokens left", where=str(train_file), hint="raise max_length")
        rep.info(f"{len(train_set.examples)} training / {len(val_set.examples)} validation examples from {train_file}")

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        dtype = pick_dtype(cfg.dtype, dist.device)
        model, _ = basemod.load_base(bref, dtype=dtype, with_tokenizer=False)
        model.to(dist.device)
        peft_model = make_lora_model(model, cfg, config.model_type)
        label = f"train {name}"
        loop = run_loop(peft_model=peft_model, cfg=cfg, train_examples=train_set.examples, val_examples=val_set.examples,
                        pad_id=tok.pad_token_id, run_dir=run_dir, signature=signature, dist=dist, reporter=rep, label=label,
                        resume_from=resume_ck)
        metrics = {"train_loss": loop.train_loss, "val_loss": loop.val_loss, "steps": loop.step, "tokens": loop.tokens,
                   "target_tokens": loop.target_tokens, "wall_time_s": round(loop.wall_time_s, 3),
                   "tokens_per_s": round(loop.tokens_per_s, 1),
                   "train_examples": len(train_set.examples), "val_examples": len(val_set.examples),
                   "truncated_rows": cut, "processes": dist.world}
        first_val = loop.history["val"][0][1] if loop.history.get("val") else None
        if first_val is not None:
            metrics["initial_val_loss"] = first_val
        result = TrainResult(name=name, bundle_dir=None, metrics=metrics, data_fingerprint=data_fp)
        if dist.main:
            _write_outputs(result, peft_model=peft_model, loop=loop, cfg=cfg, run_dir=run_dir, out_dir=out_dir,
                           registry=registry, base_ref=str(base_ref), signature=signature, task=task,
                           files=[train_file, val_file], description=description, tags=tags or [], reporter=rep)
        barrier(dist)
        return result
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(run_dir: Path):
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise TrainError("another `moemerge train` is using this run directory", where=str(run_dir),
                         hint="wait for it, or give this run another --name / --run-dir") from exc
    return lock


def _write_outputs(result: TrainResult, *, peft_model, loop, cfg: TrainConfig, run_dir: Path, out_dir, registry,
                   base_ref: str, signature: dict, task: str, files: list, description: str, tags: list[str],
                   reporter: Reporter) -> None:
    """Final adapter, loss curve, bundle (atomic), registry entry."""
    from . import __version__
    from .atomic import staging_dir
    from .bundle import ExpertMeta, write_bundle
    from .plots import save_loss_curve

    adapter_dir = run_dir / "adapter"
    with staging_dir(adapter_dir, overwrite=True) as stage:
        peft_model.save_pretrained(str(stage), safe_serialization=True, save_embedding_layers=False)
    png = save_loss_curve(loop.history, run_dir / "loss_curve.png", title=f"{result.name} ({task})")
    meta = ExpertMeta(
        name=result.name, task=task, base_model=base_ref, base_fingerprint=signature["base_fingerprint"],
        description=description or f"LoRA expert for {task}, trained with moemerge train",
        tags=sorted({"medical-moe", task, *tags}), hyperparameters=signature["hyperparameters"], metrics=result.metrics,
        data_fingerprint=signature["data_fingerprint"], datasets=[str(f) for f in files if f],
        provenance={"source": "moemerge train", "verified": True, "tool_version": __version__, "resumed_from_step": loop.resumed_from},
    )
    bundle_dir = Path(out_dir) if out_dir is not None else run_dir / "bundle"
    # the PNG stays next to the bundle, not in it: bundles hold only the file types the Hub push allows
    write_bundle(bundle_dir, adapter_dir, meta, overwrite=out_dir is None)
    if out_dir is not None:
        png = Path(shutil.copyfile(png, bundle_dir.with_name(bundle_dir.name + "-loss_curve.png")))
    result.bundle_dir = str(bundle_dir)
    result.loss_curve = str(png)
    if registry is not None:
        entry = registry.add(bundle_dir)
        result.registry_ref = entry.ref
        result.bundle_dir = str(entry.path)
        reporter.info(f"registered {entry.ref} ({entry.path})")


def expert_signature(base_ref: str | os.PathLike, cfg: TrainConfig, data_root=None) -> dict[str, Any]:
    """The run signature of training ``cfg`` on ``base_ref`` (reads only the data files, config and tokenizer)."""
    from .base import fingerprint_of
    from .data import data_fingerprint

    train_file, val_file = resolve_data(cfg, data_root)
    return run_signature(fingerprint_of(base_ref), data_fingerprint([train_file, val_file]), cfg)


def train_recipe(recipe, *, registry, reporter: Reporter | None = None, resume: bool = False, force: bool = False,
                 retrain: bool = False, only: list[str] | None = None) -> list[TrainResult]:
    """Train every expert of ``recipe`` (a ``recipe.Recipe``) that has a ``train:`` block.

    An expert whose registry entry already has the same base fingerprint, data fingerprint and
    hyperparameters is skipped (``retrain`` trains it anyway). Relative data paths resolve against the
    recipe's folder. ``resume``/``force`` are passed to :func:`train_expert`.
    """
    rep = ensure(reporter)
    base_ref = str(recipe.resolve_path(recipe.base_model)) if recipe.resolve_path(recipe.base_model).exists() else recipe.base_model
    specs = [e for e in recipe.experts if e.train is not None]
    if recipe.knowledge_expert is not None and recipe.knowledge_expert.train is not None:
        specs.append(recipe.knowledge_expert)
    if only:
        specs = [e for e in specs if e.name in only]
    if not specs:
        raise TrainError("the recipe declares no expert with a `train:` block", where=getattr(recipe, "root", None),
                         hint="add `train: {data: ...}` to an expert, or use `moemerge train --base ... --data ...`")
    results = []
    for spec in specs:
        cfg = TrainConfig.from_dict(dict(spec.train))
        task = cfg.task or spec.name
        signature = expert_signature(base_ref, cfg, recipe.root)
        entry = find_up_to_date(registry, spec.name, signature)
        if entry is not None and not retrain:
            rep.info(f"{spec.name}: up to date ({entry.ref}: same base, data and hyperparameters), skipped")
            results.append(TrainResult(name=spec.name, bundle_dir=str(entry.path), skipped=True,
                                       data_fingerprint=signature["data_fingerprint"], registry_ref=entry.ref,
                                       metrics=dict(read_bundle_meta(entry.path).metrics)))
            continue
        results.append(train_expert(base_ref, cfg, name=spec.name, task=task, registry=registry, reporter=rep,
                                    resume=resume, force=force, data_root=recipe.root, skip_up_to_date=False))
    return results


def read_bundle_meta(path):
    from .bundle import read_bundle

    return read_bundle(path).meta

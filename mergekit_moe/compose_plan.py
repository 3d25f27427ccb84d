"""Compose plans: a recipe -> a checked :class:`ComposePlan`, before any weights load.

:func:`plan_compose` does every check that needs no weights: the recipe, the base's config and
tokenizer (fingerprint), each expert's source, bundle hash and base fingerprint, LoRA shapes from
the safetensors *headers*, ranks of experts that may be merged, data files, the output path. A bad
recipe fails there, in one line, before anything heavy runs or anything is written.

This module holds the plan's dataclasses (:class:`ComposePlan`, :class:`ResolvedExpert`), expert
source resolution (:func:`resolve_source`: local directory, registry or ``hf://`` through the
``hub_resolver`` hook of this module), the header-only expert inspection and the
cluster-rank check. :mod:`mergekit_moe.compose` runs a plan and re-exports every name here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import BaseMismatchError, MoeMergeError, RecipeError, ValidationError
from .progress import Reporter, ensure
from .recipe import ExpertSpec, Recipe, SourceRef

BASELINES = ("linear", "ties", "dare_ties", "topk", "uniform")
METHODS = ("moe",) + BASELINES

__all__ = ["ComposePlan", "ResolvedExpert", "plan_compose", "resolve_source", "HubResolver", "hub_resolver", "METHODS", "BASELINES"]


@dataclass
class ResolvedExpert:
    """An expert after resolution: where its PEFT adapter lives and what we know without loading it."""

    name: str
    role: str                               # task | knowledge
    spec: ExpertSpec
    where: str                              # recipe key path, for messages
    adapter_dir: Path | None = None         # None until an inline `train:` expert is trained
    fingerprint: str | None = None          # base fingerprint from expert.json (plain PEFT dirs have none)
    sha256: str | None = None               # of adapter_model.safetensors
    ranks: dict[str, int] = field(default_factory=dict)   # module -> rank (from the safetensors header)
    provenance: dict[str, Any] = field(default_factory=dict)
    needs_training: bool = False


@dataclass
class ComposePlan:
    recipe: Recipe
    method: str
    base_ref: Any                           # base.BaseRef
    base_fingerprint: str
    config: Any                             # transformers config
    n_layers: int
    hidden_size: int
    experts: list[ResolvedExpert]           # task experts, recipe order
    knowledge: ResolvedExpert | None        # a LoRA knowledge expert
    knowledge_null: bool                    # the base itself as knowledge expert
    slots: list[int]                        # task slots per layer
    merge_method: str
    output: Path
    notes: list[str] = field(default_factory=list)   # defaults used, skipped work


#: signature of the ``hf://`` hook: (SourceRef, source text, registry, reporter, lock=, update=) -> local bundle dir.
HubResolver = Callable[..., Path]


def _default_hub_resolver(ref: SourceRef, text: str, registry, reporter: Reporter, *, lock=None, update: bool = False) -> Path:
    """The Hub module's verified, lock-pinned pull into the registry."""
    from .hub_pull import fetch_expert

    return Path(fetch_expert(text, registry, lock=lock, update=update, reporter=reporter).path)


#: the ``hf://`` hook :func:`resolve_source` calls (looked up at call time, so replacing it takes effect):
#: the Hub module's verified, lock-pinned pull into the registry; tests replace it with a local stand-in.
hub_resolver: HubResolver = _default_hub_resolver


def resolve_source(exp: ExpertSpec, recipe: Recipe, registry, reporter: Reporter, *, lock=None,
                   update: bool = False) -> tuple[Path, dict[str, Any]]:
    """An expert's ``source`` -> (local directory holding its PEFT adapter, provenance).

    ``hf://`` sources go through :data:`hub_resolver` with the recipe's lock file
    (``lockfile.LockFile``): the first run pins each to a commit and file hashes, later runs must match
    (``update`` re-resolves).
    """
    ref = exp.source_ref
    assert ref is not None
    if ref.kind == "local":
        return recipe.resolve_path(ref.name), {"source": exp.source}
    if ref.kind == "hf":
        return hub_resolver(ref, exp.source or "", registry, reporter, lock=lock, update=update), {"source": exp.source}
    entry = registry.resolve(exp.source or "")
    return Path(entry.path), {"source": exp.source, "registry_ref": getattr(entry, "ref", None)}


def _inspect_expert(r: ResolvedExpert, shapes: dict, *, base_fp: str | None = None, allow_base_mismatch: bool = False,
                    reporter: Reporter | None = None, verify: bool = True) -> None:
    """Fill fingerprint, sha256 and ranks from expert.json and the safetensors header; check base and shapes.

    The fingerprint is compared first: "trained on another base" is clearer than the shape error it causes.
    """
    from .bundle import EXPERT_JSON, read_bundle
    from .hashing import sha256_file
    from .lora import ADAPTER_WEIGHTS, parse_key, read_adapter_config
    from .safetensors_io import inspect_safetensors

    d = r.adapter_dir
    assert d is not None
    if not d.is_dir():
        raise ValidationError("expert directory not found", where=f"{r.where} ({r.name}): {d}",
                              hint="check the path, or import it with `moemerge import`")
    if (d / EXPERT_JSON).is_file():
        b = read_bundle(d)
        if verify:
            b.verify()
        r.fingerprint = b.meta.base_fingerprint
        r.provenance.update({"bundle": b.meta.name, "version": b.meta.version, "task": b.meta.task, "digest": b.digest})
        if base_fp and r.fingerprint and r.fingerprint != base_fp:
            msg = (f"expert {r.name!r} was trained on base fingerprint {r.fingerprint[:16]} ({b.meta.base_model}), "
                   f"the recipe's base has {base_fp[:16]}")
            if not allow_base_mismatch:
                raise BaseMismatchError(msg, where=f"{r.where}.source", hint="compose it on its own base, or pass --allow-base-mismatch")
            ensure(reporter).warn(msg + " (allowed by --allow-base-mismatch)")
    read_adapter_config(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValidationError(f"no {ADAPTER_WEIGHTS}", where=f"{r.where} ({r.name}): {d}",
                              hint="only safetensors adapters are composed; convert with `moemerge import --convert-pickle`")
    infos, _ = inspect_safetensors(weights)
    r.sha256 = sha256_file(weights)
    for key, info in infos.items():
        parsed = parse_key(key)
        if parsed is None or len(info.shape) != 2:
            raise ValidationError("tensor is not a LoRA A/B weight", where=f"{r.where} ({r.name}) [{key}]")
        module, ab = parsed
        if module not in shapes:
            raise ValidationError(f"module {module} does not exist in the base model", where=f"{r.where} ({r.name}) [{key}]",
                                  hint="the expert was trained on another base")
        _kind, fin, fout = shapes[module]
        want = (info.shape[0], fin) if ab == "A" else (fout, info.shape[1])
        if tuple(info.shape) != want:
            raise ValidationError(f"lora_{ab} has shape {tuple(info.shape)}, the base needs {want}",
                                  where=f"{r.where} ({r.name}) [{key}]", hint="the expert was trained on a base with other dimensions")
        if ab == "A":
            r.ranks[module] = int(info.shape[0])


def plan_compose(recipe: Recipe, *, method: str | None = None, allow_base_mismatch: bool = False, registry=None,
                 overwrite: bool | None = None, reporter: Reporter | None = None, recipe_path: str | os.PathLike | None = None,
                 update_lock: bool = False) -> ComposePlan:
    """Every check that needs no weights; raises one typed error naming the key path or expert.

    With ``recipe_path``, ``hf://`` experts are pinned in ``<recipe>.lock.json`` (written once every check passed).
    """
    from . import arch, base
    from .moe.allocate import slots_per_layer
    from .validate import module_shapes

    rep = ensure(reporter)
    method = method or recipe.method
    if method not in METHODS:
        raise RecipeError([("method", f"{method!r} is not one of {', '.join(METHODS)}")])
    try:
        bref = base.resolve_base(recipe.resolve_path(recipe.base_model) if recipe.resolve_path(recipe.base_model).exists()
                                 else recipe.base_model)
        cfg = base.load_config(bref)
        fp = base.base_fingerprint(cfg, base.load_tokenizer(bref))
    except MoeMergeError as exc:
        raise type(exc)(exc.what, where=f"base_model ({recipe.base_model})", hint=exc.hint) from None
    shapes = module_shapes(cfg)
    if registry is None:
        from .registry import Registry

        registry = Registry()
    out = recipe.resolve_path(recipe.output.path)
    if out.exists() and not (overwrite if overwrite is not None else recipe.output.overwrite):
        raise RecipeError([("output.path", f"{out} already exists (set output.overwrite: true or pass --force)")])
    task: list[ResolvedExpert] = []
    specs = [(e, "task", f"experts[{i}]") for i, e in enumerate(recipe.experts)]
    if recipe.knowledge_expert is not None:
        specs.append((recipe.knowledge_expert, "knowledge", "knowledge_expert"))
    knowledge = None
    lock = None
    if recipe_path is not None and any(e.source_ref and e.source_ref.kind == "hf" for e, _, _ in specs):
        from .lockfile import LockFile

        lock = LockFile.for_recipe(recipe_path)
    for e, role, where in specs:
        r = ResolvedExpert(e.name, role, e, where)
        if e.train is not None:
            r.needs_training = True
            r.provenance = {"source": "train", "train": dict(e.train)}
            # the rank it will have, for the cluster-rank check below (TrainConfig's default when not given)
            r.ranks = {"*": int(e.train.get("rank") or _train_default("rank", 8))}
        else:
            try:
                r.adapter_dir, r.provenance = resolve_source(e, recipe, registry, rep, lock=lock, update=update_lock)
            except MoeMergeError as exc:
                raise type(exc)(exc.what, where=f"{where}.source ({e.name})", hint=exc.hint) from None
            _inspect_expert(r, shapes, base_fp=fp, allow_base_mismatch=allow_base_mismatch, reporter=rep)
        for key, p in (("data", e.data), ("train.data", (e.train or {}).get("data"))):
            if p and not recipe.resolve_path(p).exists():
                raise RecipeError([(f"{where}.{key}", f"data file {p} not found")])
        if role == "task":
            task.append(r)
        else:
            knowledge = r
    cal = recipe.calibration
    if cal and cal.general_data and not recipe.resolve_path(cal.general_data).exists():
        raise RecipeError([("calibration.general_data", f"data file {cal.general_data} not found")])
    n_layers, n_task = arch.num_layers(cfg), len(task)
    a = recipe.allocation
    merge_method = a.merge_method
    if method in ("linear", "ties", "dare_ties"):
        slots, merge_method = [1] * n_layers, method
    elif method in ("topk", "uniform"):
        slots = [n_task] * n_layers
    else:
        slots = slots_per_layer(n_layers, n_task, schedule=a.schedule, profile=a.profile, min_slots=a.min, max_slots=a.max)
    if min(slots) < n_task and merge_method != "concat" and a.rank is None:
        _check_cluster_ranks(task)
    if lock is not None and lock.dirty:
        rep.info(f"pinned Hub experts in {lock.save()}")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    notes = list(recipe.defaults_used)
    if method in ("linear", "ties", "dare_ties"):  # one merged LoRA: no slots, no routers, whatever the recipe says
        notes = [n for n in notes if not n.startswith(("allocation", "routing", "knowledge_expert", "calibration"))]
    if method != recipe.method:
        notes.append(f"method = {method} (from the command line; the recipe says {recipe.method})")
    return ComposePlan(recipe, method, bref, fp, cfg, n_layers, int(hidden), task, knowledge,
                       recipe.knowledge and recipe.knowledge_expert is None and method not in ("linear", "ties", "dare_ties"),
                       slots, merge_method, out, notes)


def _train_default(name: str, fallback: Any) -> Any:
    import dataclasses

    from .train import TrainConfig

    f = {x.name: x for x in dataclasses.fields(TrainConfig)}.get(name)
    return f.default if f is not None and f.default is not dataclasses.MISSING else fallback


def _check_cluster_ranks(task: list[ResolvedExpert]) -> None:
    """Merging truncates a cluster to its members' rank; members of different ranks need an explicit rank."""
    ranks = {r.name: sorted(set(r.ranks.values())) for r in task if r.ranks}
    distinct = {tuple(v) for v in ranks.values()}
    if len(distinct) > 1:
        desc = ", ".join(f"{n} r={'/'.join(map(str, v))}" for n, v in ranks.items())
        raise RecipeError([("allocation.rank", f"experts that may share a cluster have different ranks ({desc}); "
                            "set allocation.rank to the rank merged clusters get, or use merge_method: concat")])

"""Recipe -> Med-MoE-LoRA checkpoint: plan (cheap checks) -> train -> allocate/merge -> router init -> calibrate -> write.

:func:`plan_compose` does every check that needs no weights: the recipe, the base's config and
tokenizer (fingerprint), each expert's source, bundle hash and base fingerprint, LoRA shapes from
the safetensors *headers*, ranks of experts that may be merged, data files, the output path. A bad
recipe fails there, in one line, before anything heavy runs or anything is written.

:func:`run_compose` then streams the experts (one adapter's LoRA tensors at a time, merged into
the stacked spec), loads the base only when router init or calibration needs it, and writes the
checkpoint into a staging directory that is renamed into place at the very end: an interrupted
compose leaves no output directory.
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


#: hook for ``hf://`` sources: (SourceRef, source text, registry, reporter, lock=, update=) -> local bundle dir.
#: Defaults to the Hub module's verified, lock-pinned pull into the registry; tests may replace it.
HubResolver = Callable[..., Path]


def _default_hub_resolver(ref: SourceRef, text: str, registry, reporter: Reporter, *, lock=None, update: bool = False) -> Path:
    from .hub_pull import fetch_expert

    return Path(fetch_expert(text, registry, lock=lock, update=update, reporter=reporter).path)


hub_resolver: HubResolver = _default_hub_resolver


def resolve_source(exp: ExpertSpec, recipe: Recipe, registry, reporter: Reporter, *, lock=None,
                   update: bool = False) -> tuple[Path, dict[str, Any]]:
    """An expert's ``source`` -> (local directory holding its PEFT adapter, provenance).

    ``hf://`` sources go through :data:`hub_resolver` with the recipe's lock file (``lockfile.LockFile``):
    the first run pins each to a commit and file hashes, later runs must match (``update`` re-resolves).
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


@dataclass
class ComposeResult:
    output: Path
    method: str
    allocation: list[tuple[int, int, str]]          # (layer, task slots, "a+b | c")
    notes: list[str]
    calibration: dict[str, Any] | None = None       # CalibrationReport.summary()
    seconds: dict[str, float] = field(default_factory=dict)   # per stage


def _train_pending(plan: ComposePlan, registry, rep: Reporter) -> None:
    from .train import TrainConfig, train_expert
    from .validate import module_shapes

    for r in plan.experts + ([plan.knowledge] if plan.knowledge else []):
        if not r.needs_training:
            continue
        res = train_expert(plan.base_ref.path, TrainConfig.from_dict(dict(r.spec.train or {})), name=r.name, registry=registry,
                           data_root=plan.recipe.root, reporter=rep)
        rep.info(f"expert {r.name}: {'already in the registry, training skipped' if res.skipped else 'trained'}")
        r.adapter_dir = Path(res.bundle_dir)
        r.provenance.update({"registry_ref": res.registry_ref})
        r.needs_training = False
        r.ranks = {}
        _inspect_expert(r, module_shapes(plan.config), base_fp=plan.base_fingerprint, reporter=rep)


def _rows(recipe: Recipe, path: str | None, task: str, limit: int) -> list[dict]:
    """Calibration / prompt rows of a data file (first ``limit``), via data.load_rows."""
    if not path:
        return []
    from .data import load_rows

    return load_rows(recipe.resolve_path(path), task=task)[:limit]


def _prompt_texts(exp: ExpertSpec | None, rows: list[dict], tokenizer, limit: int = 32) -> tuple[list[str], list[str]]:
    """The texts the router sees for an expert: its ``prompts`` (else its data's prompts), chat-formatted."""
    from .data import format_prompt

    if exp is not None and exp.prompts:
        pos = [format_prompt({"prompt": p}, tokenizer) for p in exp.prompts]
    else:
        pos = [format_prompt(r, tokenizer) if "text" not in r else r["text"] for r in rows[:limit]]
    neg = [format_prompt({"prompt": p}, tokenizer) for p in (exp.negative_prompts if exp else [])]
    return pos, neg


def run_compose(plan: ComposePlan, *, registry=None, reporter: Reporter | None = None, overwrite: bool | None = None,
                recipe_text: str | None = None) -> ComposeResult:
    """Run a checked plan and write the checkpoint atomically. Returns what was done."""
    import time

    import torch

    from . import checkpoint
    from .atomic import atomic_write_json, staging_dir
    from .base import load_base
    from .data import split_rows
    from .lora import read_adapter
    from .moe import router as rinit
    from .moe.allocate import allocate, build_spec
    from .moe.spec import NULL_EXPERT, ExpertInfo, Routing
    from .recipe import dump_recipe
    from .validate import validate_adapter

    rep = ensure(reporter)
    recipe, method = plan.recipe, plan.method
    times: dict[str, float] = {}
    t = time.perf_counter()
    for n in plan.notes:
        rep.info(f"default: {n}")
    if registry is None:
        from .registry import Registry

        registry = Registry()
    _train_pending(plan, registry, rep)
    times["train"] = time.perf_counter() - t

    # -- load the experts' LoRA tensors (small), validated against the base's module shapes
    t = time.perf_counter()
    rep.start("load experts", total=len(plan.experts) + (1 if plan.knowledge else 0))
    task, infos, knowledge_adapter = {}, {}, None
    for r in plan.experts + ([plan.knowledge] if plan.knowledge else []):
        a = read_adapter(r.adapter_dir)
        validate_adapter(a, plan.config, where=f"{r.where} ({r.name})")
        infos[r.name] = ExpertInfo(r.name, r.role, r.spec.source or "train", r.sha256, dict(r.provenance))
        if r.role == "task":
            task[r.name] = a
        else:
            knowledge_adapter = a
        rep.advance("load experts")
    rep.finish("load experts")
    times["load"] = time.perf_counter() - t

    # -- allocation and merging
    t = time.perf_counter()
    rep.start("allocate + merge", total=None)
    alloc = allocate(task, plan.slots)
    rep.finish("allocate + merge")
    top_k = recipe.routing.top_k if method != "topk" else (recipe.routing.top_k or 1)
    routing = Routing(recipe.routing.granularity, recipe.routing.temperature, top_k)
    single = method in ("linear", "ties", "dare_ties")
    kname = plan.knowledge.name if plan.knowledge else (NULL_EXPERT if plan.knowledge_null else None)
    bref = plan.base_ref
    # the checkpoint names a base that loads from anywhere: an absolute local path, or the Hub id
    base_name = str(Path(bref.path) / bref.gguf_file) if bref.gguf_file else bref.path
    spec = build_spec(task, alloc, base_model=base_name,
                      base_fingerprint=plan.base_fingerprint, hidden_size=plan.hidden_size,
                      knowledge=None if single else knowledge_adapter, knowledge_name=None if single else kname,
                      merge_method=plan.merge_method, rank=recipe.allocation.rank, density=recipe.allocation.density,
                      seed=recipe.allocation.seed, routing=routing, infos=infos, model_type=getattr(plan.config, "model_type", None),
                      reporter=rep)
    del task, knowledge_adapter  # the spec holds the stacked factors now
    times["allocate_merge"] = time.perf_counter() - t

    # -- router init (needs the base for hidden states, except uniform / single merged slot)
    t = time.perf_counter()
    init = "uniform" if method == "uniform" else recipe.routing.init
    cal = recipe.calibration if method in ("moe", "topk") else None
    if recipe.calibration is not None and cal is None:
        rep.info(f"calibration skipped: the {method} baseline is not calibrated")
    model = tok = None
    report = None
    if not single and (init != "uniform" or cal is not None):
        rep.start("router init", total=None)
        model, tok = load_base(plan.base_ref)
        limit = cal.max_rows_per_expert if cal else 256
        data_rows = {r.name: _rows(recipe, r.spec.calibration_data, r.name, limit) for r in plan.experts}
        general = _rows(recipe, cal.general_data if cal else None, "general", limit)
        if plan.knowledge:
            data_rows[plan.knowledge.name] = _rows(recipe, plan.knowledge.spec.calibration_data, plan.knowledge.name, limit)
            if not general and cal is not None:
                # no general_data: the knowledge expert's own data stands in for "general" rows
                general = data_rows[plan.knowledge.name]
        pool = "tokens" if routing.granularity == "token" else recipe.routing.hidden_pool
        pos_states, neg_states = {}, {}
        for r in plan.experts + ([plan.knowledge] if plan.knowledge else []):
            pos, neg = _prompt_texts(r.spec, data_rows.get(r.name, []), tok)
            if pos:
                pos_states[r.name] = rinit.layer_inputs(model, tok, pos, pool=pool)
            if neg:
                neg_states[r.name] = rinit.layer_inputs(model, tok, neg, pool=pool)
        if kname and kname not in pos_states and general:
            pos_states[kname] = rinit.layer_inputs(model, tok, _prompt_texts(None, general, tok)[0], pool=pool)
        probe = rinit.layer_inputs(model, tok, rinit.PROBE_TEXTS + [p for r in plan.experts for p in r.spec.prompts], pool=pool)
        st = rinit.stats(probe)
        if init == "hidden":
            missing = [r.name for r in plan.experts if r.name not in pos_states]
            if missing:
                raise RecipeError([("routing.init", f"hidden init needs prompts or data for expert(s) {', '.join(missing)}")])
            routers = rinit.hidden_init(spec, pos_states, negative_states=neg_states, reporter=rep)
        elif init == "arrow":
            routers = rinit.arrow_init(spec, st, prompt_states=pos_states)
        elif init == "random":
            routers = rinit.random_init(spec, st, seed=cal.seed if cal else 0)
        else:
            routers = rinit.uniform_init(spec)
        rinit.apply_router_init(spec, routers)
        rep.finish("router init")
        times["router_init"] = time.perf_counter() - t
        if cal is not None:
            t = time.perf_counter()
            from .moe.attach import attach_moe, extract_spec
            from .moe.calibrate import calibrate

            attach_moe(model, spec)
            train_rows, held = {}, {}
            for name in [r.name for r in plan.experts]:
                train_rows[name], held[name] = split_rows(data_rows[name], 0.2)
            g_train, g_held = split_rows(general, 0.2) if general else ([], [])
            report = calibrate(model, tok, task_rows=train_rows, held_out=held, general_rows=g_train, general_held_out=g_held,
                               cfg=cal, knowledge=kname, reporter=rep)
            spec = extract_spec(model)
            times["calibrate"] = time.perf_counter() - t
    elif not single:
        rinit.apply_router_init(spec, rinit.uniform_init(spec))
    del model

    # -- write: checkpoint + reports in one staging directory, renamed into place at the end
    t = time.perf_counter()
    spec.metrics.update({"method": method, "router_init": init if not single else "none (single merged LoRA)"})
    if recipe.output.model_card:
        spec.metrics["model_card"] = dict(recipe.output.model_card)
    if report is not None:
        summ = report.summary()
        spec.metrics.update({"calibration_steps": summ["steps"], "routing_accuracy": summ["routing_accuracy"],
                             "kl_general_before": summ["kl_general_before"], "kl_general_after": summ["kl_general_after"]})
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[recipe.output.dtype]
    for m in spec.modules.values():
        m.A, m.B, m.rho = m.A.to(dtype), m.B.to(dtype), m.rho.to(dtype)
    ow = overwrite if overwrite is not None else recipe.output.overwrite
    rep.start("write", total=None)
    with staging_dir(plan.output, overwrite=ow) as stage:
        inner = stage / "checkpoint"
        checkpoint.save_checkpoint(spec, inner, recipe_text=recipe_text if recipe_text is not None else dump_recipe(recipe))
        umask = os.umask(0)
        os.umask(umask)
        for f in inner.iterdir():
            os.replace(f, stage / f.name)
            # safetensors writes its file 0600; a checkpoint is meant to be shared like any output
            os.chmod(stage / f.name, 0o666 & ~umask)
        inner.rmdir()
        if report is not None:
            from .moe.calibrate import write_report

            write_report(report, stage / "calibration")
        atomic_write_json(stage / "compose_report.json", {
            "method": method, "notes": plan.notes, "allocation": alloc.table(),
            "calibration": report.summary() if report else None, "seconds": {k: round(v, 3) for k, v in times.items()}})
    rep.finish("write")
    times["write"] = time.perf_counter() - t
    return ComposeResult(plan.output, method, alloc.table(), plan.notes, report.summary() if report else None, times)


__all__ = ["ComposePlan", "ComposeResult", "ResolvedExpert", "plan_compose", "run_compose", "resolve_source", "compose",
           "METHODS", "BASELINES", "hub_resolver"]


def compose(recipe: Recipe | str | os.PathLike, *, method: str | None = None, allow_base_mismatch: bool = False,
            overwrite: bool | None = None, registry=None, reporter: Reporter | None = None, update_lock: bool = False) -> "ComposeResult":
    """Plan and run a recipe (a ``Recipe`` or a recipe file path: then its text is stored as given, and Hub experts locked)."""
    from .recipe import load_recipe

    path = None if isinstance(recipe, Recipe) else Path(recipe)
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = plan_compose(r, method=method, allow_base_mismatch=allow_base_mismatch, registry=registry, overwrite=overwrite,
                        reporter=reporter, recipe_path=path, update_lock=update_lock)
    text = path.read_text(encoding="utf-8") if path is not None else None
    return run_compose(plan, registry=registry, reporter=reporter, overwrite=overwrite, recipe_text=text)

"""Recipe -> Med-MoE-LoRA checkpoint: plan (cheap checks) -> train -> allocate/merge -> router init -> calibrate -> write.

:func:`~mergekit_moe.compose_plan.plan_compose` (in :mod:`mergekit_moe.compose_plan`, re-exported
here) does every check that needs no weights; a bad recipe fails there, in one line, before anything
heavy runs or anything is written.

:func:`run_compose` then streams the experts (one adapter's LoRA tensors at a time, merged into
the stacked spec), loads the base only when router init or calibration needs it, and writes the
checkpoint into a staging directory that is renamed into place at the very end: an interrupted
compose leaves no output directory. :func:`compose` plans and runs a recipe in one call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compose_plan import (BASELINES, METHODS, ComposePlan, HubResolver, ResolvedExpert, _inspect_expert, plan_compose,
                           resolve_source)
from .errors import RecipeError
from .progress import Reporter, ensure
from .recipe import ExpertSpec, Recipe


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
           "METHODS", "BASELINES"]


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

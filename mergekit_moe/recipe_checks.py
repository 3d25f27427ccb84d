"""Per-section recipe checks: a parsed YAML mapping -> :class:`~mergekit_moe.recipe.Recipe` plus problems.

:func:`build_recipe` walks every section (top level, experts and their ``train:`` blocks, allocation,
routing, calibration, output) with a :class:`~mergekit_moe.yamlsafe.Checker`, which collects
``(key path, message)`` pairs instead of stopping at the first one: unknown keys (with a "did you
mean"), wrong types, out-of-range values, missing required keys and cross-field conflicts. Each
``_section`` function fills in its dataclass with the defaults it used and notes data-free defaults
in ``defaults``. :func:`mergekit_moe.recipe.parse_recipe` turns the problems into one ``RecipeError``.
"""

from __future__ import annotations

from typing import Any

from .recipe import (ALLOCATION_KEYS, CALIBRATION_KEYS, EXPERT_KEYS, FORMAT_VERSION, GRANULARITIES, HIDDEN_POOLS, LOSS_KEYS,
                     MERGE_METHODS, METHODS, MODEL_CARD_KEYS, OUTPUT_DTYPES, OUTPUT_KEYS, PROFILES, ROUTER_INITS, ROUTING_KEYS,
                     TOP_KEYS, AllocationSpec, CalibrationSpec, ExpertSpec, OutputSpec, Recipe, RoutingSpec, parse_source)
from .yamlsafe import Checker

__all__ = ["build_recipe", "value_kind"]


def value_kind(v: Any) -> str:
    """How a wrong value is named in a message: "empty", "a list", "a string", or its type."""
    return {type(None): "empty", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def build_recipe(c: Checker, d: dict, root: str) -> Recipe | None:
    """Walk every section of a recipe mapping; problems go to ``c``, the recipe comes back only when there are none."""
    c.keys(d, TOP_KEYS, "")
    defaults: list[str] = []
    fv = c.int_(d, "format_version", "", default=FORMAT_VERSION, lo=1, hi=FORMAT_VERSION)
    base = c.str_(d, "base_model", "", required=True)
    method = c.choice(d, "method", "", METHODS, default="moe")
    experts = _experts(c, d.get("experts"), "experts") if "experts" in d else c.missing("experts", "list the task experts")
    knowledge, kexp = True, None
    if "knowledge_expert" not in d:
        defaults.append("knowledge_expert = null (the base model itself protects general knowledge)")
    elif d["knowledge_expert"] is False:
        knowledge = False
    elif d["knowledge_expert"] is not None:
        kexp = _expert(c, d["knowledge_expert"], "knowledge_expert", name_default="knowledge")
    names = [e.name for e in experts or []] + ([kexp.name] if kexp else [])
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n == "null":
            c.add("knowledge_expert.name" if kexp and i == len(names) - 1 else f"experts[{i}].name",
                  "the name 'null' is reserved for the null knowledge expert (the base model itself)")
        if n in seen:
            c.add("knowledge_expert.name" if kexp and i == len(names) - 1 else f"experts[{i}].name", f"duplicate expert name {n!r}")
        seen.add(n)
    n_task = len(experts or [])
    alloc = _allocation(c, d.get("allocation"), n_task, defaults)
    cal = _calibration(c, d.get("calibration"), defaults) if d.get("calibration") is not None else None
    if cal is None:
        defaults.append("calibration = none (data-free: routers keep their initial weights)")
    routing = _routing(c, d.get("routing"), experts or [], n_task + (1 if knowledge else 0), defaults)
    out = _output(c, d.get("output"))
    if cal is not None and experts:
        for i, e in enumerate(experts):
            if not e.calibration_data:
                c.add(f"experts[{i}].data", f"expert {e.name!r} has no calibration data", hint="give `data:` (JSONL rows) or remove `calibration:`")
    if method == "uniform" and cal is not None:
        c.add("method", "the `uniform` baseline is uncalibrated; remove `calibration:` or pick another method")
    if c.problems or experts is None or base is None or out is None or alloc is None or routing is None:
        return None
    return Recipe(base_model=base, experts=experts, output=out, knowledge_expert=kexp, knowledge=knowledge, allocation=alloc,
                  routing=routing, calibration=cal, method=method, format_version=fv, root=root, defaults_used=defaults)


def _experts(c: Checker, v: Any, path: str) -> list[ExpertSpec] | None:
    if not isinstance(v, list) or not v:
        c.add(path, f"must be a non-empty list of experts, got {value_kind(v)}")
        return None
    out = [_expert(c, item, f"{path}[{i}]") for i, item in enumerate(v)]
    return [e for e in out if e is not None] if all(e is not None for e in out) else None


def _expert(c: Checker, v: Any, path: str, name_default: str | None = None) -> ExpertSpec | None:
    if not isinstance(v, dict):
        c.add(path, f"an expert is a mapping with name and source (or train), got {value_kind(v)}")
        return None
    c.keys(v, EXPERT_KEYS, path)
    name = c.name(v, "name", path, default=name_default)
    source = c.str_(v, "source", path)
    if source is not None:
        try:
            parse_source(source)
        except ValueError as exc:
            c.add(f"{path}.source", str(exc))
    train = _train_block(c, v.get("train"), f"{path}.train") if v.get("train") is not None else None
    if source is None and train is None and "source" not in v:
        c.add(path, f"expert {name or '?'!r} needs a `source` (registry name, local PEFT dir, hf://org/repo) or a `train:` block")
    if source is not None and v.get("train") is not None:
        c.add(f"{path}.train", "give either `source` or `train`, not both")
    prompts = c.str_list(v, "prompts", path)
    neg = c.str_list(v, "negative_prompts", path)
    data = c.str_(v, "data", path)
    if name is None:
        return None
    return ExpertSpec(name=name, source=source, train=train, prompts=prompts or [], negative_prompts=neg or [], data=data)


def _train_block(c: Checker, v: Any, path: str) -> dict[str, Any] | None:
    """Check a ``train:`` block against ``train.TrainConfig``'s fields (imported lazily)."""
    if not isinstance(v, dict):
        c.add(path, f"must be a mapping of training settings, got {value_kind(v)}")
        return None
    try:
        import dataclasses

        from .train import TrainConfig  # engineer B's module; validated only when present
    except ImportError:
        return dict(v)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    c.keys(v, set(fields), path)
    if "data" not in v:
        c.add(f"{path}.data", "required: the task data file to train on")
    out = dict(v)
    for k, val in v.items():
        f = fields.get(k)
        if f is None or val is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            c.bool_(v, k, path)
        elif isinstance(default, int) or k == "max_steps":
            c.int_(v, k, path, lo=0)
        elif isinstance(default, float):
            num = c.num(v, k, path, lo=0.0)
            if num is not None:
                out[k] = num  # `lr: 1e-4` is text in YAML 1.1: hand TrainConfig a number
        elif isinstance(default, str) or k in ("data", "validation_data", "task"):
            c.str_(v, k, path)
        elif k == "target_modules" and not isinstance(val, str):
            c.str_list(v, k, path)
    return out


def _schedule_value(c: Checker, v: Any, path: str, n_task: int) -> int | str | None:
    if v == "all":
        return "all"
    if isinstance(v, bool) or not isinstance(v, int):
        c.add(path, f"slots must be a positive integer or 'all', got {v!r}")
        return None
    if v < 1 or (n_task and v > n_task):
        c.add(path, f"{v} slots is out of range: between 1 and the {n_task} task expert(s), or 'all'")
        return None
    return v


def _allocation(c: Checker, v: Any, n_task: int, defaults: list[str]) -> AllocationSpec | None:
    path = "allocation"
    if v is None:
        defaults.append("allocation = every task expert in its own slot in every layer (no merging)")
        return AllocationSpec(schedule=["all"])
    if not isinstance(v, dict):
        c.add(path, f"must be a mapping (schedule or profile, merge_method), got {value_kind(v)}")
        return None
    c.keys(v, ALLOCATION_KEYS, path)
    a = AllocationSpec()
    if v.get("schedule") is not None and v.get("profile") is not None:
        c.add(f"{path}.profile", "give either `schedule` or `profile`, not both")
    if v.get("schedule") is not None:
        s = v["schedule"]
        if not isinstance(s, list) or not s:
            c.add(f"{path}.schedule", f"must be a non-empty list of slots per depth group (e.g. [1, 2, 4, all]), got {value_kind(s)}")
        else:
            a.schedule = [_schedule_value(c, x, f"{path}.schedule[{i}]", n_task) for i, x in enumerate(s)]
    elif v.get("profile") is not None:
        a.profile = c.choice(v, "profile", path, PROFILES)
    else:
        a.schedule = ["all"]
        defaults.append("allocation.schedule = [all] (every task expert in its own slot, no merging)")
    a.min = _schedule_value(c, v.get("min", 1), f"{path}.min", n_task) or 1
    a.max = _schedule_value(c, v.get("max", "all"), f"{path}.max", n_task) or "all"
    if a.profile and isinstance(a.min, int) and isinstance(a.max, int) and a.min > a.max:
        c.add(f"{path}.min", f"min ({a.min}) is larger than max ({a.max})")
    a.merge_method = c.choice(v, "merge_method", path, MERGE_METHODS, default="linear") or "linear"
    a.rank = c.int_(v, "rank", path, lo=1, hi=65536)
    a.density = c.num(v, "density", path, default=0.5, lo=0.0, hi=1.0, lo_open=True) or 0.5
    a.seed = c.int_(v, "seed", path, default=0, lo=0) or 0
    return a


def _routing(c: Checker, v: Any, experts: list[ExpertSpec], n_slots_max: int, defaults: list[str]) -> RoutingSpec | None:
    path = "routing"
    v = {} if v is None else v
    if not isinstance(v, dict):
        c.add(path, f"must be a mapping (granularity, temperature, top_k, init), got {value_kind(v)}")
        return None
    c.keys(v, ROUTING_KEYS, path)
    r = RoutingSpec()
    r.granularity = c.choice(v, "granularity", path, GRANULARITIES, default="token") or "token"
    r.temperature = c.num(v, "temperature", path, default=1.0, lo=0.0, hi=100.0, lo_open=True) or 1.0
    r.top_k = c.int_(v, "top_k", path, lo=1, hi=max(n_slots_max, 1))
    r.hidden_pool = c.choice(v, "hidden_pool", path, HIDDEN_POOLS, default="mean") or "mean"
    if v.get("init") is None:
        with_prompts = bool(experts) and all(e.prompts for e in experts)
        r.init = "hidden" if with_prompts else "arrow"
        why = "every expert has prompts" if with_prompts else "data-free: top singular vectors of each expert's delta"
        defaults.append(f"routing.init = {r.init} ({why})")
    else:
        r.init = c.choice(v, "init", path, ROUTER_INITS) or "arrow"
        if r.init == "hidden":
            for i, e in enumerate(experts):
                if not e.prompts and not e.calibration_data:
                    c.add(f"experts[{i}].prompts", f"routing.init is hidden but expert {e.name!r} has no prompts or data")
    return r


def _calibration(c: Checker, v: Any, defaults: list[str]) -> CalibrationSpec | None:
    path = "calibration"
    if not isinstance(v, dict):
        c.add(path, f"must be a mapping (steps, lr, batch_size, loss_weights...), got {value_kind(v)}")
        return None
    c.keys(v, CALIBRATION_KEYS, path)
    s = CalibrationSpec()
    s.general_data = c.str_(v, "general_data", path)
    s.general_fraction = c.num(v, "general_fraction", path, default=0.25, lo=0.0, hi=1.0)
    s.steps = c.int_(v, "steps", path, default=100, lo=1, hi=1_000_000) or 100
    s.lr = c.num(v, "lr", path, default=5e-3, lo=0.0, hi=10.0, lo_open=True) or 5e-3
    s.batch_size = c.int_(v, "batch_size", path, default=8, lo=1, hi=4096) or 8
    s.max_length = c.int_(v, "max_length", path, default=128, lo=8, hi=131072) or 128
    s.max_rows_per_expert = c.int_(v, "max_rows_per_expert", path, default=256, lo=1) or 256
    s.train_rho = c.bool_(v, "train_rho", path, default=True)
    s.seed = c.int_(v, "seed", path, default=0, lo=0) or 0
    lw = v.get("loss_weights")
    if lw is not None:
        if not isinstance(lw, dict):
            c.add(f"{path}.loss_weights", f"must be a mapping of {', '.join(sorted(LOSS_KEYS))} to weights, got {value_kind(lw)}")
        else:
            c.keys(lw, LOSS_KEYS, f"{path}.loss_weights")
            for k in sorted(LOSS_KEYS & set(lw)):
                val = c.num(lw, k, f"{path}.loss_weights", lo=0.0, hi=1000.0)
                if val is not None:
                    s.loss_weights[k] = val
    if s.general_data is None and s.general_fraction:
        s.general_fraction = 0.0
        defaults.append("calibration.general_fraction = 0 (no general_data given: no KL-to-base term)")
    return s


def _output(c: Checker, v: Any) -> OutputSpec | None:
    path = "output"
    if v is None:
        c.missing("output", "where to write the checkpoint, e.g. `output: {path: ./my-moe}`")
        return None
    if isinstance(v, str):
        v = {"path": v}
    if not isinstance(v, dict):
        c.add(path, f"must be a mapping with path (and dtype, model_card), got {value_kind(v)}")
        return None
    c.keys(v, OUTPUT_KEYS, path)
    p = c.str_(v, "path", path, required=True)
    dtype = c.choice(v, "dtype", path, OUTPUT_DTYPES, default="float32") or "float32"
    overwrite = c.bool_(v, "overwrite", path, default=False)
    card = v.get("model_card") or {}
    if not isinstance(card, dict):
        c.add(f"{path}.model_card", f"must be a mapping ({', '.join(sorted(MODEL_CARD_KEYS))}), got {value_kind(card)}")
        card = {}
    else:
        c.keys(card, MODEL_CARD_KEYS, f"{path}.model_card")
        for k in ("title", "description", "license"):
            c.str_(card, k, f"{path}.model_card")
        for k in ("tags", "language", "datasets"):
            c.str_list(card, k, f"{path}.model_card")
    return OutputSpec(path=p, dtype=dtype, overwrite=bool(overwrite), model_card=dict(card)) if p else None

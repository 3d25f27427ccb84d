"""Compose recipes: strict YAML -> a validated :class:`Recipe`, every problem reported at once.

The YAML is read by :mod:`mergekit_moe.yamlsafe` (no aliases, tags or duplicate keys). The schema
check then walks every section and collects ``(key path, message)`` pairs: unknown keys (with a
"did you mean" for misspellings), wrong types, out-of-range values, missing required keys and
cross-field conflicts. One :class:`~mergekit_moe.errors.RecipeError` carries them all.

``parse_recipe(dump_recipe(r)) == r`` for every valid recipe: the dump is canonical (every key
written out), so the defaults a parse filled in are part of it. ``Recipe.defaults_used`` lists
the defaults a parse filled in, so ``compose`` can say which data-free defaults it used.
See ``docs/recipes.md`` for the reference of every key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import yamlsafe
from .errors import RecipeError
from .yamlsafe import Checker

TOP_KEYS = {"format_version", "base_model", "method", "experts", "knowledge_expert", "allocation", "routing", "calibration", "output"}
EXPERT_KEYS = {"name", "source", "train", "prompts", "negative_prompts", "data"}
ALLOCATION_KEYS = {"schedule", "profile", "min", "max", "merge_method", "rank", "density", "seed"}
ROUTING_KEYS = {"granularity", "temperature", "top_k", "init", "hidden_pool"}
CALIBRATION_KEYS = {"general_data", "general_fraction", "steps", "lr", "batch_size", "max_length", "max_rows_per_expert",
                    "loss_weights", "train_rho", "seed"}
LOSS_KEYS = {"lm", "routing", "balance", "kl"}
OUTPUT_KEYS = {"path", "dtype", "overwrite", "model_card"}
MODEL_CARD_KEYS = {"title", "description", "license", "tags", "language", "datasets"}
METHODS = {"moe", "linear", "ties", "dare_ties", "topk", "uniform"}
MERGE_METHODS = {"linear", "ties", "dare_ties", "concat"}
PROFILES = {"constant", "increasing"}
GRANULARITIES = {"token", "sequence"}
ROUTER_INITS = {"hidden", "arrow", "uniform", "random"}
HIDDEN_POOLS = {"last", "mean"}
OUTPUT_DTYPES = {"float32", "bfloat16", "float16"}

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_REG_RE = re.compile(rf"^(?P<name>{_NAME})(?:@(?P<ver>[A-Za-z0-9_.+-]+))?$")
_SHA_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class SourceRef:
    """Where an expert comes from. ``kind``: registry | local | hf."""

    kind: str
    name: str                       # registry name, local path, or Hub repo id (org/repo)
    version: str | None = None      # registry version or Hub revision
    subfolder: str | None = None    # Hub subfolder


def parse_source(text: str) -> SourceRef:
    """``name[@version]`` / ``sha256:<hex>`` (registry), a path (local PEFT dir) or ``hf://org/repo[@rev][:subfolder]``."""
    if text.startswith("hf://"):
        # one grammar for Hub references across the project (refs.py); its errors become key-path problems
        from .errors import MoeMergeError
        from .refs import parse_ref

        try:
            ref = parse_ref(text)
        except MoeMergeError as exc:
            raise ValueError(f"bad Hub source {text!r}: {exc.what} (expected hf://org/repo[@revision][:subfolder])") from None
        return SourceRef("hf", ref.repo_id, ref.revision, ref.subfolder or None)
    if "://" in text:
        raise ValueError(f"unsupported source scheme in {text!r}: use hf://, a registry name or a local path")
    if _SHA_RE.match(text):
        return SourceRef("registry", text)
    if "/" in text or "\\" in text or text.startswith((".", "~")):
        return SourceRef("local", text)
    m = _REG_RE.match(text)
    if not m:
        raise ValueError(f"bad expert source {text!r}: expected a registry name[@version], a local directory or hf://org/repo")
    return SourceRef("registry", m.group("name"), m.group("ver"))


FORMAT_VERSION = 1
__all__ = ["Recipe", "ExpertSpec", "AllocationSpec", "RoutingSpec", "CalibrationSpec", "OutputSpec", "SourceRef",
           "parse_recipe", "load_recipe", "dump_recipe", "parse_source", "FORMAT_VERSION"]


@dataclass
class ExpertSpec:
    """One expert: a ``source`` (registry ref, local PEFT dir, ``hf://``) or an inline ``train:`` block."""

    name: str
    source: str | None = None
    train: dict[str, Any] | None = None
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    data: str | None = None  # calibration data file (defaults to train.data)

    @property
    def source_ref(self) -> SourceRef | None:
        return parse_source(self.source) if self.source else None

    @property
    def calibration_data(self) -> str | None:
        return self.data or (self.train or {}).get("data")


@dataclass
class AllocationSpec:
    """Slots per layer (``schedule`` per depth group, or a ``profile``) and how clusters are merged."""

    schedule: list[int | str] | None = None   # e.g. [1, 2, 4, "all"] over equal depth groups
    profile: str | None = None                # constant | increasing (with min/max)
    min: int | str = 1
    max: int | str = "all"
    merge_method: str = "linear"              # linear | ties | dare_ties | concat
    rank: int | None = None                   # rank after merging a cluster (None: members' rank / sum for concat)
    density: float = 0.5                      # kept fraction for ties / dare_ties
    seed: int = 0                             # DARE's random drop mask


@dataclass
class RoutingSpec:
    granularity: str = "token"                # token | sequence
    temperature: float = 1.0
    top_k: int | None = None                  # None: soft mixture over all slots
    init: str = "arrow"                       # hidden | arrow | uniform | random
    hidden_pool: str = "mean"                 # last | mean (hidden init: which token states)


@dataclass
class CalibrationSpec:
    general_data: str | None = None
    general_fraction: float = 0.25            # share of each batch drawn from general data
    steps: int = 100
    lr: float = 5e-3
    batch_size: int = 8
    max_length: int = 128
    max_rows_per_expert: int = 256
    loss_weights: dict[str, float] = field(default_factory=lambda: {"lm": 1.0, "routing": 1.0, "balance": 0.1, "kl": 1.0})
    train_rho: bool = True
    seed: int = 0


@dataclass
class OutputSpec:
    path: str
    dtype: str = "float32"                    # float32 | bfloat16 | float16
    overwrite: bool = False
    model_card: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    base_model: str
    experts: list[ExpertSpec]
    output: OutputSpec
    knowledge_expert: ExpertSpec | None = None   # None with knowledge=True: the base model itself (null expert)
    knowledge: bool = True                       # False: no knowledge path at all (`knowledge_expert: false`)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    calibration: CalibrationSpec | None = None
    method: str = "moe"                          # moe | linear | ties | dare_ties | topk | uniform
    format_version: int = FORMAT_VERSION
    #: where relative paths are resolved (the recipe file's folder); not part of equality
    root: str = field(default=".", compare=False)
    #: defaults a parse filled in ("routing.init = arrow (...)"); not part of equality
    defaults_used: list[str] = field(default_factory=list, compare=False)

    def resolve_path(self, value: str | os.PathLike) -> Path:
        """A recipe path (data file, local expert, output) relative to the recipe's folder."""
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else Path(self.root) / p

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def to_dict(self) -> dict[str, Any]:
        """Canonical plain data (every key written); ``parse_recipe(dump(to_dict()))`` gives an equal recipe."""
        def expert(e: ExpertSpec) -> dict[str, Any]:
            return {"name": e.name, "source": e.source, "train": e.train, "prompts": list(e.prompts),
                    "negative_prompts": list(e.negative_prompts), "data": e.data}

        a, r, o = self.allocation, self.routing, self.output
        knowledge: Any = expert(self.knowledge_expert) if self.knowledge_expert else (None if self.knowledge else False)
        cal = self.calibration
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "method": self.method,
            "experts": [expert(e) for e in self.experts],
            "knowledge_expert": knowledge,
            "allocation": {"schedule": list(a.schedule) if a.schedule is not None else None, "profile": a.profile,
                           "min": a.min, "max": a.max, "merge_method": a.merge_method, "rank": a.rank,
                           "density": a.density, "seed": a.seed},
            "routing": {"granularity": r.granularity, "temperature": r.temperature, "top_k": r.top_k, "init": r.init,
                        "hidden_pool": r.hidden_pool},
            "calibration": None if cal is None else {
                "general_data": cal.general_data, "general_fraction": cal.general_fraction, "steps": cal.steps, "lr": cal.lr,
                "batch_size": cal.batch_size, "max_length": cal.max_length, "max_rows_per_expert": cal.max_rows_per_expert,
                "loss_weights": dict(cal.loss_weights), "train_rho": cal.train_rho, "seed": cal.seed},
            "output": {"path": o.path, "dtype": o.dtype, "overwrite": o.overwrite, "model_card": dict(o.model_card)},
        }


def dump_recipe(recipe: Recipe) -> str:
    """Canonical YAML text of a recipe (every key written out)."""
    return yamlsafe.dump(recipe.to_dict())


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; relative paths in it resolve against its folder."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RecipeError([("<file>", f"cannot read recipe: {exc.strerror or exc}")], file=str(p)) from exc
    return parse_recipe(data, file=str(p), root=str(p.resolve().parent))


def parse_recipe(text: str | bytes, *, file: str | None = None, root: str = ".") -> Recipe:
    """Validate recipe text; raise one :class:`RecipeError` listing every problem with its key path."""
    try:
        data = yamlsafe.load(text)
    except yamlsafe.YamlProblem as exc:
        raise RecipeError([(exc.path, exc.message)], file=file) from None
    if not isinstance(data, dict):
        raise RecipeError([("<root>", f"a recipe is a YAML mapping with base_model, experts and output, not {_kind(data)}")], file=file)
    c = Checker()
    recipe = _build(c, data, root)
    if c.problems:
        raise RecipeError(c.problems, file=file)
    assert recipe is not None
    return recipe


def _kind(v: Any) -> str:
    return {type(None): "empty", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def _build(c: Checker, d: dict, root: str) -> Recipe | None:
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
        c.add(path, f"must be a non-empty list of experts, got {_kind(v)}")
        return None
    out = [_expert(c, item, f"{path}[{i}]") for i, item in enumerate(v)]
    return [e for e in out if e is not None] if all(e is not None for e in out) else None


def _expert(c: Checker, v: Any, path: str, name_default: str | None = None) -> ExpertSpec | None:
    if not isinstance(v, dict):
        c.add(path, f"an expert is a mapping with name and source (or train), got {_kind(v)}")
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
        c.add(path, f"must be a mapping of training settings, got {_kind(v)}")
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
        c.add(path, f"must be a mapping (schedule or profile, merge_method), got {_kind(v)}")
        return None
    c.keys(v, ALLOCATION_KEYS, path)
    a = AllocationSpec()
    if v.get("schedule") is not None and v.get("profile") is not None:
        c.add(f"{path}.profile", "give either `schedule` or `profile`, not both")
    if v.get("schedule") is not None:
        s = v["schedule"]
        if not isinstance(s, list) or not s:
            c.add(f"{path}.schedule", f"must be a non-empty list of slots per depth group (e.g. [1, 2, 4, all]), got {_kind(s)}")
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
        c.add(path, f"must be a mapping (granularity, temperature, top_k, init), got {_kind(v)}")
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
        c.add(path, f"must be a mapping (steps, lr, batch_size, loss_weights...), got {_kind(v)}")
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
            c.add(f"{path}.loss_weights", f"must be a mapping of {', '.join(sorted(LOSS_KEYS))} to weights, got {_kind(lw)}")
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
        c.add(path, f"must be a mapping with path (and dtype, model_card), got {_kind(v)}")
        return None
    c.keys(v, OUTPUT_KEYS, path)
    p = c.str_(v, "path", path, required=True)
    dtype = c.choice(v, "dtype", path, OUTPUT_DTYPES, default="float32") or "float32"
    overwrite = c.bool_(v, "overwrite", path, default=False)
    card = v.get("model_card") or {}
    if not isinstance(card, dict):
        c.add(f"{path}.model_card", f"must be a mapping ({', '.join(sorted(MODEL_CARD_KEYS))}), got {_kind(card)}")
        card = {}
    else:
        c.keys(card, MODEL_CARD_KEYS, f"{path}.model_card")
        for k in ("title", "description", "license"):
            c.str_(card, k, f"{path}.model_card")
        for k in ("tags", "language", "datasets"):
            c.str_list(card, k, f"{path}.model_card")
    return OutputSpec(path=p, dtype=dtype, overwrite=bool(overwrite), model_card=dict(card)) if p else None

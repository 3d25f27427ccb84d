"""Compose recipes: strict YAML -> a validated :class:`Recipe`, every problem reported at once.

This module holds the recipe dataclasses (:class:`Recipe` and its sections), the key sets and
allowed values of every section, ``parse_source`` and the entry points ``load_recipe``,
``parse_recipe`` and ``dump_recipe``.

The YAML is read by :mod:`mergekit_moe.yamlsafe` (no aliases, tags or duplicate keys). The schema
check (:mod:`mergekit_moe.recipe_checks`) then walks every section and collects ``(key path, message)``
pairs: unknown keys (with a "did you mean" for misspellings), wrong types, out-of-range values,
missing required keys and cross-field conflicts. One :class:`~mergekit_moe.errors.RecipeError`
carries them all.

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
    # the section checks build this module's dataclasses, so they are imported here, not at the top
    from .recipe_checks import build_recipe, value_kind

    try:
        data = yamlsafe.load(text)
    except yamlsafe.YamlProblem as exc:
        raise RecipeError([(exc.path, exc.message)], file=file) from None
    if not isinstance(data, dict):
        raise RecipeError([("<root>", f"a recipe is a YAML mapping with base_model, experts and output, not {value_kind(data)}")], file=file)
    c = Checker()
    recipe = build_recipe(c, data, root)
    if c.problems:
        raise RecipeError(c.problems, file=file)
    assert recipe is not None
    return recipe

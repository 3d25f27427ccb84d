"""Composed Med-MoE-LoRA checkpoint: write, read (hash-verified), inspect, and load onto a base.

A checkpoint is a directory::

    moe_config.json        format_version, base (ref, fingerprint, model_type, hidden_size), routing,
                           experts (provenance, sha256), per-layer slots and ranks, files (sha256, size)
    moe_lora.safetensors   layers.<L>.router.weight (S, hidden) [.bias (S,)],
                           modules.<name>.A (R, in) / .B (out, R) / .slot_of_rank (R,) int64 / .rho (R,)
    recipe.yaml            the recipe as given (a comment when composed programmatically)
    README.md              model card: base, experts table, allocation per layer, metrics

It is written into a staging directory and renamed into place (never half-written). See
docs/formats.md (composed checkpoint section).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import dump_json, staging_dir
from .errors import CheckpointError, FormatError, IntegrityError, UnsafeFileError
from .hashing import sha256_file
from .moe.spec import FORMAT_VERSION, ExpertInfo, LayerSpec, ModuleLora, MoeSpec, Routing, SlotSpec

CONFIG = "moe_config.json"
WEIGHTS = "moe_lora.safetensors"
RECIPE = "recipe.yaml"
CARD = "README.md"
_TENSOR_DTYPES = frozenset({"F32", "F16", "BF16", "F64", "I64"})


def _tensors(spec: MoeSpec) -> dict:
    out = {}
    for L, lay in spec.layers.items():
        out[f"layers.{L}.router.weight"] = lay.router_weight.detach().cpu().contiguous()
        if lay.router_bias is not None:
            out[f"layers.{L}.router.bias"] = lay.router_bias.detach().cpu().contiguous()
    for name, m in spec.modules.items():
        out[f"modules.{name}.A"] = m.A.detach().cpu().contiguous()
        out[f"modules.{name}.B"] = m.B.detach().cpu().contiguous()
        out[f"modules.{name}.slot_of_rank"] = m.slot_of_rank.detach().cpu().long().contiguous()
        out[f"modules.{name}.rho"] = m.rho.detach().cpu().contiguous()
    return out


def config_dict(spec: MoeSpec) -> dict[str, Any]:
    """The JSON-able part of a spec (everything but tensors and file hashes)."""
    layers = []
    for L, lay in sorted(spec.layers.items()):
        ranks = spec.slot_ranks(L)
        layers.append({"index": L, "router_bias": lay.router_bias is not None,
                       "slots": [dict(s.to_json(), ranks=ranks[s.name]) for s in lay.slots]})
    return {
        "format_version": spec.format_version,
        "created_by": f"mergekit-moe {__version__}",
        "base": {"model": spec.base_model, "fingerprint": spec.base_fingerprint, "model_type": spec.model_type,
                 "hidden_size": spec.hidden_size},
        "routing": spec.routing.to_json(),
        "experts": [e.to_json() for e in spec.experts.values()],
        "layers": layers,
        "target_modules": {name: {"layer": spec.layer_of(name), "rank": m.rank} for name, m in sorted(spec.modules.items())},
        "parameter_counts": spec.parameter_counts(),
        "metrics": spec.metrics,
    }


def save_checkpoint(spec: MoeSpec, out_dir: str | os.PathLike, *, recipe_text: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``spec`` as a checkpoint directory (staging dir, then rename). Returns the directory."""
    from safetensors.torch import save_file

    spec.validate()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError("output already exists", where=str(out), hint="pass overwrite=True (--force) or choose another directory")
    recipe = recipe_text if recipe_text is not None else spec.recipe
    with staging_dir(out, overwrite=overwrite) as stage:
        save_file(_tensors(spec), str(stage / WEIGHTS), metadata={"format": "mergekit-moe", "format_version": str(FORMAT_VERSION)})
        (stage / RECIPE).write_text(recipe if recipe else "# composed programmatically: no recipe\n", encoding="utf-8")
        cfg = config_dict(spec)
        (stage / CARD).write_text(model_card(spec, cfg), encoding="utf-8")
        cfg["files"] = {f: {"sha256": sha256_file(stage / f), "size": (stage / f).stat().st_size} for f in (WEIGHTS, RECIPE, CARD)}
        (stage / CONFIG).write_text(dump_json(cfg), encoding="utf-8")
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / CONFIG
    if not p.is_file():
        raise CheckpointError(f"no {CONFIG}", where=str(path), hint="is this a Med-MoE-LoRA checkpoint directory (moemerge compose output)?")
    _no_link(p)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"not valid JSON ({exc})", where=str(p)) from exc
    except RecursionError as exc:  # absurdly nested JSON: a crafted file, not a checkpoint
        raise FormatError("JSON nested too deeply", where=str(p)) from exc
    if not isinstance(cfg, dict):
        raise FormatError("must be a JSON object", where=str(p))
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"format_version {cfg.get('format_version')!r} is not supported (this version reads {FORMAT_VERSION})",
                              where=f"{p} [format_version]", hint="upgrade mergekit-moe or re-compose the checkpoint")
    return cfg


def verify_files(path: str | os.PathLike, cfg: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Check every file listed in ``moe_config.json`` against its sha256 and size; return the table."""
    path = Path(path)
    cfg = cfg or read_config(path)
    files = cfg.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise CheckpointError(f"{CONFIG} lists no files with hashes", where=str(path / CONFIG) + " [files]")
    for name, meta in files.items():
        p = path / name
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not isinstance(meta, dict):
            raise CheckpointError("file entry is not a plain file name with sha256 and size", where=f"{path / CONFIG} [files.{name}]")
        _no_link(p)
        if not p.is_file():
            raise IntegrityError("file listed in moe_config.json is missing", where=str(p))
        if p.stat().st_size != meta.get("size") or sha256_file(p) != meta.get("sha256"):
            raise IntegrityError("sha256/size does not match moe_config.json", where=str(p),
                                 hint="the checkpoint was modified or is incomplete; re-compose or re-download it")
    return files


def _no_link(p: Path) -> None:
    """Checkpoint files must be regular files: a symbolic link could point at anything on the machine."""
    if p.is_symlink():
        raise UnsafeFileError("is a symbolic link; checkpoints hold regular files only", where=str(p),
                              hint="copy the real file into the checkpoint directory")


def _key_error(key: str, msg: str, path: Path) -> CheckpointError:
    return CheckpointError(msg, where=f"{path / WEIGHTS} [{key}]")


def load_checkpoint(path: str | os.PathLike) -> MoeSpec:
    """Read and verify a checkpoint directory into a ``MoeSpec`` (hashes checked, tensors validated)."""
    from .safetensors_io import load_safetensors

    path = Path(path)
    cfg = read_config(path)
    files = verify_files(path, cfg)
    tensors = load_safetensors(path / WEIGHTS, allowed_dtypes=_TENSOR_DTYPES)
    used: set[str] = set()

    def take(key: str):
        if key not in tensors:
            raise _key_error(key, "tensor is missing", path)
        used.add(key)
        return tensors[key]

    try:
        base = cfg["base"]
        experts = {e["name"]: ExpertInfo.from_json(e) for e in cfg["experts"]}
        layers = {}
        for lay in cfg["layers"]:
            L = int(lay["index"])
            bias = take(f"layers.{L}.router.bias") if lay.get("router_bias") else None
            layers[L] = LayerSpec([SlotSpec.from_json(s) for s in lay["slots"]], take(f"layers.{L}.router.weight"), bias)
        modules = {}
        for name in cfg["target_modules"]:
            k = f"modules.{name}"
            modules[name] = ModuleLora(take(f"{k}.A"), take(f"{k}.B"), take(f"{k}.slot_of_rank").long(), take(f"{k}.rho"))
        spec = MoeSpec(str(base["model"]), str(base.get("fingerprint") or ""), int(base["hidden_size"]),
                       Routing.from_json(cfg.get("routing") or {}), experts, layers, modules,
                       model_type=base.get("model_type"), metrics=dict(cfg.get("metrics") or {}),
                       format_version=int(cfg["format_version"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"missing or malformed entry ({type(exc).__name__}: {exc})", where=str(path / CONFIG)) from exc
    extra = sorted(set(tensors) - used)
    if extra:
        raise _key_error(extra[0], f"unexpected tensor ({len(extra)} not described by {CONFIG})", path)
    # only a hash-verified recipe is read (an unlisted file could be anything, or a link)
    spec.recipe = (path / RECIPE).read_text(encoding="utf-8") if RECIPE in files else None
    try:
        spec.validate()
    except CheckpointError as exc:
        raise CheckpointError(exc.what, where=f"{path} [{exc.where}]", hint=exc.hint) from exc
    return spec


@dataclass
class CheckpointSummary:
    """What ``moemerge inspect`` shows: the spec, the verified file table, the raw config."""

    path: Path
    spec: MoeSpec
    files: dict[str, dict[str, Any]]
    config: dict[str, Any]


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointSummary:
    """Load and verify a checkpoint (raises on any hash mismatch) and return a summary for display."""
    path = Path(path)
    spec = load_checkpoint(path)
    cfg = read_config(path)
    return CheckpointSummary(path, spec, dict(cfg["files"]), cfg)


def attach_moe(model, spec_or_path: MoeSpec | str | os.PathLike, *, tokenizer=None):
    """Attach a checkpoint (a ``MoeSpec`` or a checkpoint directory) to ``model``; returns the model."""
    from .moe.attach import attach_moe as _attach

    spec = spec_or_path if isinstance(spec_or_path, MoeSpec) else load_checkpoint(spec_or_path)
    return _attach(model, spec, tokenizer=tokenizer)


def detach_moe(model):
    """Restore the model's original modules (see ``moe.attach.detach_moe``)."""
    from .moe.attach import detach_moe as _detach

    return _detach(model)


def load_moe_model(path_or_spec: MoeSpec | str | os.PathLike, *, base: str | None = None, dtype=None):
    """Load the base named in the checkpoint (or ``base``), check its fingerprint, attach. Returns (model, tokenizer, spec)."""
    from .base import load_base

    spec = path_or_spec if isinstance(path_or_spec, MoeSpec) else load_checkpoint(path_or_spec)
    model, tok = load_base(base or spec.base_model, dtype=dtype)
    attach_moe(model, spec, tokenizer=tok)
    return model, tok, spec


def model_card(spec: MoeSpec, cfg: dict[str, Any] | None = None) -> str:
    """README.md with Hub metadata, experts table, per-layer allocation and metrics."""
    cfg = cfg or config_dict(spec)
    counts = cfg["parameter_counts"]
    lines = ["---", f"base_model: {json.dumps(spec.base_model)}", "library_name: mergekit-moe",
             "tags:", "- mergekit-moe", "- med-moe-lora", "- lora", "- mixture-of-experts", "---", "",
             "# Med-MoE-LoRA checkpoint", "",
             f"Base model: `{spec.base_model}` (fingerprint `{spec.base_fingerprint[:16]}`). "
             f"Routing: {spec.routing.granularity}-level, temperature {spec.routing.temperature}, "
             f"top-k {spec.routing.top_k or 'all'}. Parameters: {counts['lora']:,} LoRA, {counts['router']:,} router, "
             f"{counts['rho']:,} rho.", "",
             "Load it with `moemerge generate THIS_DIR \"prompt\"` or `mergekit_moe.checkpoint.load_moe_model`; "
             "export a fixed mixture with `moemerge export-peft` / `moemerge export-merged`.", "",
             "## Experts", "", "| name | role | source | sha256 |", "|---|---|---|---|"]
    for e in spec.experts.values():
        lines.append(f"| {e.name} | {e.role} | {e.source or '-'} | {(e.sha256 or '-')[:16]} |")
    lines += ["", "## Allocation per layer", "", "| layer | slots | slot (members, method, total rank) |", "|---|---|---|"]
    for L, lay in sorted(spec.layers.items()):
        ranks = spec.slot_ranks(L)
        desc = "; ".join(f"{s.name} ({'+'.join(s.members)}, {s.method}, r={sum(ranks[s.name].values())})" for s in lay.slots)
        lines.append(f"| {L} | {lay.n_slots} | {desc} |")
    if spec.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(spec.metrics.items())]
    return "\n".join(lines) + "\n"

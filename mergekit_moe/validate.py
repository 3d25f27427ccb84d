"""Adapter-vs-base validation, and the one guarded path for pickle adapters.

``validate_adapter`` checks that a LoRA adapter fits a base model: every target module named
in the config exists, every tensor maps to an existing linear module, ``A`` is (r, in) and
``B`` is (out, r) for that module, ranks agree with the config, and no value is NaN/Inf.
Errors name the tensor (``base_model.model.<module>.lora_A.weight``).

The base is only needed for module shapes, so a config is built on the ``meta`` device: no
weights are allocated or read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UnsafeFileError, ValidationError
from .lora import ADAPTER_WEIGHTS, _pattern_value

#: file suffixes of pickle-based checkpoints (torch.save / pickle); never loaded without --convert-pickle
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PEFT_PREFIX = "base_model.model."

#: (kind, in_features, out_features) per module name
ModuleShapes = dict[str, tuple[str, int, int]]
_SHAPE_CACHE: dict[str, ModuleShapes] = {}


def _shapes_of_model(model) -> ModuleShapes:
    out: ModuleShapes = {}
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        w = getattr(mod, "weight", None)
        if w is None or getattr(w, "dim", lambda: 0)() != 2:
            continue
        if kind == "Conv1D":  # GPT-2: weight is (in, out)
            out[name] = (kind, int(w.shape[0]), int(w.shape[1]))
        elif kind == "Embedding":
            out[name] = (kind, int(w.shape[0]), int(w.shape[1]))
        else:  # nn.Linear and subclasses: weight is (out, in)
            out[name] = (kind, int(w.shape[1]), int(w.shape[0]))
    return out


def module_shapes(base_model_or_config) -> ModuleShapes:
    """Module name -> (kind, in, out) for a model, a transformers config, or a base reference."""
    import torch

    if isinstance(base_model_or_config, torch.nn.Module):
        return _shapes_of_model(base_model_or_config)
    cfg = base_model_or_config
    if isinstance(cfg, (str, os.PathLike)):
        from .base import load_config

        cfg = load_config(cfg)
    from transformers import AutoModelForCausalLM

    from .hashing import sha256_json

    key = sha256_json(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if key not in _SHAPE_CACHE:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        _SHAPE_CACHE[key] = _shapes_of_model(model)
    return _SHAPE_CACHE[key]


def _matches_target(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_target_modules(cfg: dict, shapes: ModuleShapes, *, where: str = "adapter_config.json") -> None:
    """Every entry of ``target_modules`` must match at least one module of the base (PEFT suffix rule)."""
    targets = cfg.get("target_modules")
    if targets in (None, "all-linear"):
        return
    if isinstance(targets, str):  # PEFT treats a string as a regex that must fullmatch a module name
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise ValidationError(f"target_modules regex {targets!r} is invalid ({exc})", where=f"{where}: target_modules") from exc
        if not any(rx.fullmatch(n) for n in shapes):
            raise ValidationError(f"target_modules regex {targets!r} matches no module of the base", where=f"{where}: target_modules",
                                  hint="the adapter was trained on another architecture")
        return
    for t in targets:
        if not any(_matches_target(n, str(t)) for n in shapes):
            sample = sorted({n.rsplit(".", 1)[-1] for n, s in shapes.items() if s[0] != "Embedding"})[:10]
            raise ValidationError(f"target module {t!r} matches no module of the base", where=f"{where}: target_modules",
                                  hint=f"base modules include {', '.join(sample)}; was the adapter trained on another base?")


def validate_adapter(adapter, base_model_or_config, *, where: str = "") -> None:
    """Check a ``lora.Adapter`` against a base (model, config or reference). Raises ValidationError naming the tensor.

    Shapes: for a module with weight (out, in), ``A`` must be (r, in) and ``B`` (out, r), with
    ``r`` equal to the config's ``r`` (or its ``rank_pattern`` entry).
    """
    import torch

    shapes = module_shapes(base_model_or_config)
    prefix = f"{where} " if where else ""
    check_target_modules(adapter.config, shapes, where=f"{where or 'adapter_config.json'}")
    cfg_r = adapter.config.get("r")
    for module, f in sorted(adapter.factors.items()):
        key_a = f"{_PEFT_PREFIX}{module}.lora_A.weight"
        key_b = f"{_PEFT_PREFIX}{module}.lora_B.weight"
        if module not in shapes:
            parent = module.rsplit(".", 1)[0]
            hint = "no module of that name in the base; was the adapter trained on another base?"
            if any(n.startswith(parent + ".") for n in shapes):
                hint = "the parent exists but not this module; was the adapter trained on another architecture?"
            raise ValidationError(f"module {module} does not exist in the base model", where=f"{prefix}[{key_a}]", hint=hint)
        kind, fin, fout = shapes[module]
        if kind == "Embedding":
            raise ValidationError("LoRA on embeddings is not supported", where=f"{prefix}[{key_a}]")
        A, B = f.A, f.B
        if A.dim() != 2 or B.dim() != 2:
            raise ValidationError(f"LoRA factors must be 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}", where=f"{prefix}[{key_a}]")
        r = int(A.shape[0])
        if int(A.shape[1]) != fin:
            raise ValidationError(f"lora_A has shape {tuple(A.shape)} but the base module takes {fin} inputs (expected ({r}, {fin}))",
                                  where=f"{prefix}[{key_a}]", hint="the adapter was trained on a base with other dimensions")
        if int(B.shape[0]) != fout or int(B.shape[1]) != r:
            raise ValidationError(f"lora_B has shape {tuple(B.shape)} but expected ({fout}, {r}) for this module and rank",
                                  where=f"{prefix}[{key_b}]", hint="the adapter was trained on a base with other dimensions")
        expected_r = _pattern_value(adapter.config.get("rank_pattern") or {}, module, cfg_r if cfg_r is not None else r)
        if int(expected_r) != r:
            raise ValidationError(f"rank {r} in the tensors but {expected_r} in the adapter config", where=f"{prefix}[{key_a}]",
                                  hint="the adapter config and weights do not belong together")
        for key, t in ((key_a, A), (key_b, B)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValidationError("tensor contains NaN or Inf values", where=f"{prefix}[{key}]", hint="the adapter is corrupt or training diverged")


def pickle_weights(adapter_dir: str | os.PathLike) -> list[Path]:
    """Pickle-format weight files in an adapter directory (``adapter_model.bin`` and friends)."""
    d = Path(adapter_dir)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES) if d.is_dir() else []


def convert_pickle_adapter(src: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Convert a pickle adapter weight file to safetensors, loading with ``weights_only=True`` (tensors only).

    Only call this on files the user explicitly asked to convert (``--convert-pickle``).
    """
    import pickle

    import torch
    from safetensors.torch import save_file

    src = Path(src)
    try:
        # weights_only=True: the restricted unpickler refuses any object that is not a tensor/container
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise UnsafeFileError(f"refused to convert: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", where=str(src),
                              hint="the file holds objects other than tensors (or is not a torch checkpoint)") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafeFileError("not a flat {name: tensor} state dict", where=str(src), hint="export the adapter with PEFT save_pretrained")
    out = Path(out_file)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    return out


__all__ = ["validate_adapter", "module_shapes", "check_target_modules", "pickle_weights", "convert_pickle_adapter",
           "PICKLE_SUFFIXES", "ADAPTER_WEIGHTS"]

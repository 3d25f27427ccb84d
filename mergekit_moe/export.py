"""Export a fixed mixture of a Med-MoE-LoRA checkpoint as a standard PEFT LoRA or a merged dense model.

For fixed expert weights ``w`` the MoE-LoRA module is a plain LoRA: the gate of rank component k
is the constant ``g_k = w_{slot(k)} * rho_k``, so ``B (g * (A x)) = (B diag(g)) A x``. The export
keeps ``A`` and folds ``g`` into the columns of ``B`` (rank concatenation, exact); components with
``g_k = 0`` are dropped. ``export_merged`` adds ``(B diag(g)) A`` to each base weight instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_write_json, staging_dir
from .errors import BaseMismatchError, CheckpointError, UsageError
from .moe.spec import MoeSpec


def parse_weights(text: str) -> dict[str, float]:
    """``"diagnosis=0.7,ddi=0.3"`` -> ``{"diagnosis": 0.7, "ddi": 0.3}`` (a bare ``name`` means weight 1)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        try:
            w = float(val) if sep else 1.0
        except ValueError:
            raise UsageError(f"weight {val!r} for {name!r} is not a number", where="--weights",
                             hint="write --weights diagnosis=0.7,ddi=0.3") from None
        if not name or name in out:
            raise UsageError(f"empty or repeated expert name in {text!r}", where="--weights")
        out[name] = w
    if not out:
        raise UsageError("no expert weights given", where="--weights", hint="write --weights diagnosis=0.7,ddi=0.3")
    return out


def mixture_factors(spec: MoeSpec, weights: dict[str, float]) -> dict[str, tuple]:
    """Per module ``(A (r', in), B' (out, r'))`` in float32 with the fixed gate folded into ``B'``.

    Modules whose every component has gate 0 are left out. Raises ``ValidationError`` on unknown experts.
    """
    import torch

    out = {}
    slot_w = {L: spec.slot_weights(L, weights) for L in spec.layers}
    for name, m in sorted(spec.modules.items()):
        if m.rank == 0:
            continue
        g = slot_w[spec.layer_of(name)][m.slot_of_rank.long()] * m.rho.float()    # (R,)
        keep = g != 0
        if not bool(keep.any()):
            continue
        A = m.A.float()[keep].contiguous()
        B = (m.B.float() * g.unsqueeze(0))[:, keep].contiguous()
        out[name] = (A, B)
    if not out:
        raise CheckpointError("the mixture gives every module a zero update: nothing to export",
                              hint=f"give a non-zero weight to a task expert ({', '.join(spec.experts)})")
    return out


def pad_to_uniform_rank(factors: dict[str, tuple]) -> dict[str, tuple]:
    """Zero-pad every module's factors to the largest rank: same product ``B A``, one ``r`` for the whole adapter.

    Serving stacks (vLLM, LoRAX) want one rank per adapter and may ignore ``rank_pattern``; zero
    rows of A / columns of B add nothing, so the adapter stays exact.
    """
    import torch.nn.functional as F

    r = max(int(a.shape[0]) for a, _ in factors.values())
    return {m: (F.pad(a, (0, 0, 0, r - a.shape[0])), F.pad(b, (0, r - b.shape[1]))) for m, (a, b) in factors.items()}


def export_peft(spec: MoeSpec, weights: dict[str, float], out_dir: str | os.PathLike, *, dtype=None,
                overwrite: bool = False, uniform_rank: bool = True) -> Path:
    """Write a standard PEFT LoRA adapter (``PeftModel.from_pretrained`` works) equal to the fixed mixture.

    ``uniform_rank`` (default) zero-pads all modules to one rank for serving stacks; otherwise each
    module keeps its exact rank via ``rank_pattern``.
    """
    from .lora import write_adapter

    factors = mixture_factors(spec, weights)
    if uniform_rank:
        factors = pad_to_uniform_rank(factors)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError("output already exists", where=str(out), hint="pass --force or choose another directory")
    with staging_dir(out, overwrite=overwrite) as stage:
        write_adapter(stage, factors, base_model=spec.base_model, fan_in_fan_out=spec.model_type == "gpt2", dtype=dtype)
        atomic_write_json(stage / "mixture.json", {"format_version": 1, "weights": weights, "base_model": spec.base_model,
                                                  "base_fingerprint": spec.base_fingerprint, "experts": list(spec.experts)})
        ranks = sorted({int(a.shape[0]) for a, _ in factors.values()})
        mix = ", ".join(f"{k}={v:g}" for k, v in weights.items())
        (stage / "README.md").write_text(
            f"---\nbase_model: \"{spec.base_model}\"\nlibrary_name: peft\ntags:\n- lora\n- mergekit-moe\n---\n\n"
            f"# Fixed-mixture export of a Med-MoE-LoRA checkpoint\n\nMixture: {mix}. Exact rank concatenation of the "
            f"experts' factors with the mixture folded into lora_B; ranks {ranks[0]}..{ranks[-1]} over "
            f"{len(factors)} modules. Load with `PeftModel.from_pretrained(base, THIS_DIR)`.\n", encoding="utf-8")
    return out


def export_merged(spec: MoeSpec, base_ref: str | os.PathLike | None, weights: dict[str, float], out_dir: str | os.PathLike,
                  *, dtype=None, overwrite: bool = False) -> Path:
    """Write a dense transformers model directory (safetensors) with the fixed mixture merged into the base weights."""
    import torch

    from .base import base_fingerprint, load_base

    factors = mixture_factors(spec, weights)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError("output already exists", where=str(out), hint="pass --force or choose another directory")
    model, tok = load_base(base_ref or spec.base_model, dtype=torch.float32)
    if spec.base_fingerprint and base_fingerprint(model.config, tok) != spec.base_fingerprint:
        raise BaseMismatchError("the base model's fingerprint differs from the checkpoint's", where=str(base_ref or spec.base_model),
                                hint=f"use the base it was composed on ({spec.base_model})")
    names = dict(model.named_modules())
    with torch.no_grad():
        for name, (A, B) in factors.items():
            mod = names.get(name)
            if mod is None:
                raise CheckpointError("target module not found in the base model", where=name)
            delta = B @ A                                   # (out, in), float32
            w = mod.weight
            if isinstance(mod, torch.nn.Linear):
                w.add_(delta.to(w.dtype))
            else:                                           # GPT-2 Conv1D stores (in, out)
                w.add_(delta.t().to(w.dtype))
    if dtype is not None:
        model = model.to(dtype)
    with staging_dir(out, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        atomic_write_json(stage / "mixture.json", {"format_version": 1, "weights": weights, "base_model": spec.base_model,
                                                  "base_fingerprint": spec.base_fingerprint, "experts": list(spec.experts)})
    return out

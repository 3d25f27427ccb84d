"""PEFT LoRA adapters as plain factors: read an adapter directory, write one back.

A LoRA update of a base module ``W`` (out x in) is ``delta = scale * B @ A`` with ``A`` (r x in),
``B`` (out x r) and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). GPT-2 ``Conv1D``
modules use the same A/B convention in PEFT (only merging transposes).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, FormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraFactors:
    """One module's LoRA factors. Shapes: A (r, in), B (out, r)."""

    module: str
    A: "object"  # torch.Tensor
    B: "object"  # torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self):
        """The dense update ``scale * B @ A`` (out, in), in float32."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass
class Adapter:
    config: dict
    factors: dict[str, LoraFactors]  # base module name -> factors

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.factors)


def parse_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> (module, "A")."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    module = m.group("module")
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX):]
    return module, m.group("ab")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module-name suffix (regex)."""
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise BundleError(f"no {ADAPTER_CONFIG}", where=str(adapter_dir), hint="is this a PEFT LoRA adapter directory?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise FormatError(f"not valid JSON ({type(exc).__name__})", where=str(path)) from exc
    if not isinstance(cfg, dict):
        raise FormatError("adapter config must be a JSON object", where=str(path))
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise BundleError(f"peft_type is {cfg.get('peft_type')!r}, only LORA adapters are supported", where=str(path))
    if cfg.get("use_dora"):
        raise BundleError("DoRA adapters are not supported (use_dora=true)", where=str(path))
    return cfg


def module_scale(cfg: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank))
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def factors_from_tensors(cfg: dict, tensors: dict, *, where: str = "") -> dict[str, LoraFactors]:
    """Group ``...lora_A.weight`` / ``...lora_B.weight`` tensors into per-module factors."""
    parts: dict[str, dict[str, object]] = {}
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise BundleError("tensor is not a LoRA A/B weight", where=f"{where} [{key}]",
                              hint="only plain LoRA adapters are supported (no modules_to_save, biases or embeddings)")
        module, ab = parsed
        parts.setdefault(module, {})[ab] = t
    out: dict[str, LoraFactors] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise BundleError(f"module has lora_{'A' if 'A' not in ab else 'B'} missing", where=f"{where} [{module}]")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise BundleError(f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not share a rank", where=f"{where} [{module}]")
        rank = int(A.shape[0])
        expected = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank))
        if int(expected) != rank:
            raise BundleError(f"rank {rank} in the tensors but {expected} in the adapter config", where=f"{where} [{module}]",
                              hint="the adapter config and weights do not belong together")
        out[module] = LoraFactors(module, A, B, module_scale(cfg, module, rank))
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory (safetensors only) into per-module factors (float32)."""
    from .safetensors_io import load_safetensors

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise BundleError(f"no {ADAPTER_WEIGHTS}", where=str(adapter_dir), hint="only safetensors adapters are loaded; see `moemerge import --convert-pickle`")
    tensors = {k: v.float() for k, v in load_safetensors(weights).items()}
    return Adapter(cfg, factors_from_tensors(cfg, tensors, where=str(weights)))


def write_adapter(out_dir: str | os.PathLike, factors: dict[str, tuple], *, base_model: str, task_type: str = "CAUSAL_LM",
                  fan_in_fan_out: bool = False, dtype=None) -> Path:
    """Write a standard PEFT LoRA adapter from ``{module: (A (r,in), B (out,r))}`` with the scale baked into B.

    ``lora_alpha`` equals ``r`` (and ``alpha_pattern`` mirrors ``rank_pattern``), so PEFT's scale is 1
    for every module whatever its rank: the adapter computes exactly ``B @ A``.
    """
    from collections import Counter

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {m: int(a.shape[0]) for m, (a, _b) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    # PEFT matches pattern keys as module-name suffixes; full escaped names are unambiguous
    rank_pattern = {re.escape(m): rk for m, rk in ranks.items() if rk != r}
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in factors})
    cfg = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
        "target_modules": suffixes, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = (a if dtype is None else a.to(dtype)).contiguous()
        tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = (b if dtype is None else b.to(dtype)).contiguous()
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir

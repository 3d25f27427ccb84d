"""Per-architecture facts: which projections LoRA targets by default, where the layer index is.

Only families we test are listed; any other causal LM works when target modules are given
explicitly, and the layer index is found with the generic pattern below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchInfo:
    family: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    #: Conv1D (GPT-2) stores weights as (in, out) instead of nn.Linear's (out, in)
    conv1d: bool = False

    @property
    def all_linear(self) -> tuple[str, ...]:
        return self.attention + self.mlp


_LLAMA_LIKE = ArchInfo("llama", ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))

ARCHS: dict[str, ArchInfo] = {
    "llama": _LLAMA_LIKE,
    "mistral": ArchInfo("mistral", _LLAMA_LIKE.attention, _LLAMA_LIKE.mlp),
    "qwen2": ArchInfo("qwen2", _LLAMA_LIKE.attention, _LLAMA_LIKE.mlp),
    "qwen3": ArchInfo("qwen3", _LLAMA_LIKE.attention, _LLAMA_LIKE.mlp),
    "phi3": ArchInfo("phi3", ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")),
    "gpt2": ArchInfo("gpt2", ("c_attn", "c_proj"), ("c_fc", "mlp.c_proj"), conv1d=True),
}

#: matches the decoder-block index in module names: model.layers.3.self_attn.q_proj, transformer.h.3.attn.c_attn
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


def arch_for(model_type: str) -> ArchInfo | None:
    return ARCHS.get(model_type)


def default_target_modules(model_type: str) -> list[str]:
    """Default LoRA targets: all attention and MLP projections (what we train experts on)."""
    info = arch_for(model_type)
    if info is None:
        return []
    if info.family == "gpt2":
        # PEFT matches by module-name suffix; "c_proj" covers attn.c_proj and mlp.c_proj
        return ["c_attn", "c_proj", "c_fc"]
    return list(info.all_linear)


def layer_index(module_name: str) -> int | None:
    """Decoder-block index of a module name, or None for modules outside the blocks."""
    m = LAYER_RE.search(module_name)
    return int(m.group(1)) if m else None


def num_layers(config) -> int:
    """Number of decoder blocks of a transformers config."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        val = getattr(config, key, None)
        if isinstance(val, int):
            return val
    raise ValueError(f"cannot tell the number of layers of a {type(config).__name__}")

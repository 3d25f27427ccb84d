"""Med-MoE-LoRA runtime: the in-memory spec, the rank-wise MoE-LoRA layer, attach/detach, routing controls.

Submodules import torch lazily where they can; import what you need from the submodules
(``from mergekit_moe.moe.spec import MoeSpec``, ``from mergekit_moe.moe.attach import attach_moe``).
"""

from .spec import FORMAT_VERSION, NULL_EXPERT, ExpertInfo, LayerSpec, ModuleLora, MoeSpec, Routing, SlotSpec

__all__ = ["FORMAT_VERSION", "NULL_EXPERT", "ExpertInfo", "LayerSpec", "ModuleLora", "MoeSpec", "Routing", "SlotSpec"]

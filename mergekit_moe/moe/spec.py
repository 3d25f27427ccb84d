"""``MoeSpec``: the in-memory form of a composed Med-MoE-LoRA checkpoint.

Vocabulary:

* an **expert** is a named LoRA (a task expert, or the protected knowledge expert). The knowledge
  expert may be *null*: rank 0 everywhere, i.e. the base model itself.
* a **slot** is what the router of one decoder layer chooses among. At layer ``L`` each slot is one
  expert, a merged cluster of several task experts, or the knowledge expert, so layer ``L`` has
  ``n_slots(L)`` slots and its router is ``Linear(hidden, n_slots(L))``.
* per **target module** (``model.layers.3.self_attn.q_proj``) the slots' LoRA factors are stacked
  along the rank axis: ``A`` (R, in), ``B`` (out, R) with each slot's scale folded into ``B``,
  ``slot_of_rank`` (R,) long (the slot of each rank component) and ``rho`` (R,) (per-rank scale,
  init 1). The layer computes ``y = W x + B (g(x) * (A x))`` with ``g_k = pi_{slot_of_rank[k]} * rho_k``.
  Rank-0 slots simply have no columns; a module none of whose slots has rank there is absent.

Forced mixtures are given in *expert* names (``{"diagnosis": 1.0}``) and mapped to slot weights per
layer by :meth:`MoeSpec.slot_weights` (a slot holding several experts gets the sum of their weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..arch import layer_index
from ..errors import CheckpointError, ValidationError

if TYPE_CHECKING:  # torch is imported lazily so that `import mergekit_moe.moe.spec` stays cheap
    import torch

    from ..lora import Adapter

FORMAT_VERSION = 1
GRANULARITIES = ("token", "sequence")
#: name used for the null knowledge expert (rank 0 everywhere: the base model itself)
NULL_EXPERT = "null"
ROLES = ("task", "knowledge")


@dataclass
class Routing:
    """Router settings shared by every layer."""

    granularity: str = "token"       # "token" | "sequence"
    temperature: float = 1.0         # softmax(logits / temperature)
    top_k: int | None = None         # keep the k largest slot weights per layer, renormalised

    def validate(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValidationError(f"routing granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}",
                                  where="routing.granularity")
        if not self.temperature > 0:
            raise ValidationError(f"routing temperature must be > 0, got {self.temperature}", where="routing.temperature")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ValidationError(f"routing top_k must be >= 1 or null, got {self.top_k}", where="routing.top_k")

    def to_json(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "temperature": float(self.temperature), "top_k": self.top_k}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Routing":
        r = cls(str(d.get("granularity", "token")), float(d.get("temperature", 1.0)),
                None if d.get("top_k") is None else int(d["top_k"]))
        r.validate()
        return r


@dataclass
class ExpertInfo:
    """One expert's identity and provenance (no tensors: those live in the stacked modules)."""

    name: str
    role: str = "task"               # "task" | "knowledge"
    source: str = ""                 # registry ref, path or Hub ref it came from; "null" for the null expert
    sha256: str | None = None        # sha256 of its adapter_model.safetensors (None for the null expert)
    provenance: dict[str, Any] = field(default_factory=dict)  # free-form: task, version, bundle sha, metrics...

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "source": self.source, "sha256": self.sha256,
                "provenance": self.provenance}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ExpertInfo":
        return cls(str(d["name"]), str(d.get("role", "task")), str(d.get("source", "")), d.get("sha256"),
                   dict(d.get("provenance") or {}))


@dataclass
class SlotSpec:
    """A routable slot of one layer: ``members`` are expert names; ``method`` says how they were merged.

    ``method``: "single" (one expert, exact), "concat" (exact rank concatenation), "linear" / "ties" /
    "dare" (merged then truncated), "null" (the null knowledge expert: no ranks).
    """

    name: str
    members: list[str]
    method: str = "single"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "method": self.method}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SlotSpec":
        return cls(str(d["name"]), [str(m) for m in d["members"]], str(d.get("method", "single")))


@dataclass
class LayerSpec:
    """One decoder layer: its slots and its router ``Linear(hidden, n_slots)``.

    ``router_weight`` (n_slots, hidden), ``router_bias`` (n_slots,) or None. Zeros = uniform routing.
    """

    slots: list[SlotSpec]
    router_weight: "torch.Tensor"
    router_bias: "torch.Tensor | None" = None

    @property
    def n_slots(self) -> int:
        return len(self.slots)


@dataclass
class ModuleLora:
    """Stacked factors of one target module. Shapes: A (R, in), B (out, R), slot_of_rank (R,) long, rho (R,).

    Each slot's LoRA scale (alpha/r) is already folded into its columns of ``B``.
    """

    A: "torch.Tensor"
    B: "torch.Tensor"
    slot_of_rank: "torch.Tensor"
    rho: "torch.Tensor"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def slot_ranks(self, n_slots: int) -> list[int]:
        """Rank each slot has at this module (0 where a slot has no columns)."""
        import torch

        return torch.bincount(self.slot_of_rank.long(), minlength=n_slots).tolist()


@dataclass
class MoeSpec:
    """A composed Med-MoE-LoRA model, in memory. ``modules`` maps full module names to stacked factors."""

    base_model: str
    base_fingerprint: str
    hidden_size: int
    routing: Routing
    experts: dict[str, ExpertInfo]
    layers: dict[int, LayerSpec]
    modules: dict[str, ModuleLora]
    model_type: str | None = None
    recipe: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # ---- queries -------------------------------------------------------------------------
    @property
    def target_modules(self) -> list[str]:
        return sorted(self.modules)

    @property
    def knowledge_expert(self) -> str | None:
        return next((e.name for e in self.experts.values() if e.role == "knowledge"), None)

    def n_slots(self, layer: int) -> int:
        return self.layers[layer].n_slots

    def layer_of(self, module: str) -> int:
        idx = layer_index(module)
        if idx is None:
            raise ValidationError("target module is not inside a decoder layer", where=module,
                                  hint="Med-MoE-LoRA routes per decoder layer; embeddings and lm_head cannot be targets")
        return idx

    def modules_of_layer(self, layer: int) -> list[str]:
        return [m for m in self.target_modules if layer_index(m) == layer]

    def slot_ranks(self, layer: int) -> dict[str, dict[str, int]]:
        """``{slot name: {module: rank}}`` at one layer (the allocation table of the model card)."""
        lay = self.layers[layer]
        out: dict[str, dict[str, int]] = {s.name: {} for s in lay.slots}
        for m in self.modules_of_layer(layer):
            for s, r in zip(lay.slots, self.modules[m].slot_ranks(lay.n_slots)):
                out[s.name][m] = r
        return out

    def slot_weights(self, layer: int, expert_weights: dict[str, float]) -> "torch.Tensor":
        """Map a forced mixture in expert names to the slot weights of ``layer``: (n_slots,) float32.

        Weights are used as given (not renormalised), so ``{"a": 0.7, "b": 0.3}`` equals PEFT's
        ``add_weighted_adapter(["a", "b"], [0.7, 0.3], combination_type="cat")``.
        """
        import torch

        unknown = sorted(set(expert_weights) - set(self.experts))
        if unknown:
            raise ValidationError(f"unknown expert(s) {', '.join(unknown)} in the mixture",
                                  hint=f"experts in this checkpoint: {', '.join(self.experts)}")
        lay = self.layers[layer]
        return torch.tensor([sum(float(expert_weights.get(m, 0.0)) for m in s.members) for s in lay.slots],
                            dtype=torch.float32)

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: LoRA factors, routers, rho (for ``inspect`` and the model card)."""
        lora = sum(m.A.numel() + m.B.numel() for m in self.modules.values())
        rho = sum(m.rho.numel() for m in self.modules.values())
        router = sum(l.router_weight.numel() + (0 if l.router_bias is None else l.router_bias.numel())
                     for l in self.layers.values())
        return {"lora": lora, "router": router, "rho": rho, "total": lora + router + rho}

    # ---- consistency ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check every cross-reference and shape; raise ``CheckpointError`` naming the tensor/key."""
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(f"format_version {self.format_version} is not supported (this version reads {FORMAT_VERSION})",
                                  where="format_version", hint="upgrade mergekit-moe")
        self.routing.validate()
        for name, e in self.experts.items():
            if e.name != name or e.role not in ROLES:
                raise CheckpointError(f"expert entry is inconsistent (name {e.name!r}, role {e.role!r})", where=f"experts.{name}")
        if sum(e.role == "knowledge" for e in self.experts.values()) > 1:
            raise CheckpointError("more than one knowledge expert", where="experts")
        for L, lay in self.layers.items():
            where = f"layers.{L}"
            if not lay.slots:
                raise CheckpointError("layer has no slots", where=where)
            if len({s.name for s in lay.slots}) != lay.n_slots:
                raise CheckpointError("duplicate slot names", where=f"{where}.slots")
            for s in lay.slots:
                bad = [m for m in s.members if m not in self.experts]
                if bad or not s.members:
                    raise CheckpointError(f"slot {s.name!r} names unknown experts {bad}", where=f"{where}.slots")
            if not lay.router_weight.is_floating_point() or (lay.router_bias is not None and not lay.router_bias.is_floating_point()):
                raise CheckpointError("router tensors must be floating point", where=f"{where}.router")
            if tuple(lay.router_weight.shape) != (lay.n_slots, self.hidden_size):
                raise CheckpointError(f"router weight {tuple(lay.router_weight.shape)} is not (n_slots={lay.n_slots}, hidden={self.hidden_size})",
                                      where=f"{where}.router.weight")
            if lay.router_bias is not None and tuple(lay.router_bias.shape) != (lay.n_slots,):
                raise CheckpointError(f"router bias {tuple(lay.router_bias.shape)} is not ({lay.n_slots},)", where=f"{where}.router.bias")
        for name, m in self.modules.items():
            L = self.layer_of(name)
            if L not in self.layers:
                raise CheckpointError(f"module is in layer {L}, which has no router", where=f"modules.{name}")
            if not (m.A.is_floating_point() and m.B.is_floating_point() and m.rho.is_floating_point()) or m.slot_of_rank.is_floating_point():
                raise CheckpointError("A, B and rho must be floating point and slot_of_rank an integer tensor", where=f"modules.{name}")
            R = m.rank
            if m.A.dim() != 2 or m.B.dim() != 2 or m.B.shape[1] != R or tuple(m.slot_of_rank.shape) != (R,) or tuple(m.rho.shape) != (R,):
                raise CheckpointError(f"shapes do not fit: A {tuple(m.A.shape)}, B {tuple(m.B.shape)}, slot_of_rank {tuple(m.slot_of_rank.shape)}, rho {tuple(m.rho.shape)}",
                                      where=f"modules.{name}", hint="A (R,in), B (out,R), slot_of_rank (R,), rho (R,)")
            if R and (int(m.slot_of_rank.min()) < 0 or int(m.slot_of_rank.max()) >= self.layers[L].n_slots):
                raise CheckpointError(f"slot_of_rank points outside the {self.layers[L].n_slots} slots of layer {L}", where=f"modules.{name}.slot_of_rank")

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_experts(cls, base_model: str, base_fingerprint: str, experts: "dict[str, Adapter]", *,
                     hidden_size: int, knowledge: str | None = None, model_type: str | None = None,
                     routing: Routing | None = None, infos: dict[str, ExpertInfo] | None = None,
                     dtype=None) -> "MoeSpec":
        """The simplest spec: every expert its own slot at every layer (exact concat), zero routers (uniform).

        ``experts`` maps names to adapters (``lora.read_adapter``), in slot order. ``knowledge`` names the
        knowledge expert: one of ``experts``, or ``"null"`` to add the null expert (rank 0: the base model).
        ``infos`` gives provenance per expert (defaults: role/source only). A module an expert lacks
        contributes nothing for that expert (its slot has rank 0 there).
        """
        import torch

        infos = dict(infos or {})
        names = list(experts)
        if knowledge is not None and knowledge != NULL_EXPERT and knowledge not in experts:
            raise ValidationError(f"knowledge expert {knowledge!r} is not among the experts ({', '.join(names)})", where="knowledge")
        slot_names = names + ([NULL_EXPERT] if knowledge == NULL_EXPERT and NULL_EXPERT not in experts else [])
        expert_infos: dict[str, ExpertInfo] = {}
        for n in slot_names:
            info = infos.get(n) or ExpertInfo(n, source=NULL_EXPERT if n == NULL_EXPERT and n not in experts else "")
            info.role = "knowledge" if n == knowledge else "task"
            expert_infos[n] = info
        modules_all = sorted({m for a in experts.values() for m in a.factors})
        dt = dtype or torch.float32
        modules: dict[str, ModuleLora] = {}
        layer_ids: set[int] = set()
        for mod in modules_all:
            idx = layer_index(mod)
            if idx is None:
                raise ValidationError("LoRA module is not inside a decoder layer", where=mod)
            layer_ids.add(idx)
            As, Bs, slots = [], [], []
            for s, n in enumerate(names):
                f = experts[n].factors.get(mod)
                if f is None:
                    continue
                As.append(f.A.to(dt))
                Bs.append((f.B.float() * f.scale).to(dt))  # fold alpha/r into B
                slots.append(torch.full((f.rank,), s, dtype=torch.long))
            A, B = torch.cat(As, 0).contiguous(), torch.cat(Bs, 1).contiguous()
            modules[mod] = ModuleLora(A, B, torch.cat(slots), torch.ones(A.shape[0], dtype=dt))
        slots = [SlotSpec(n, [n], "null" if n == NULL_EXPERT and n not in experts else "single") for n in slot_names]
        layers = {L: LayerSpec([SlotSpec(s.name, list(s.members), s.method) for s in slots],
                               torch.zeros(len(slots), hidden_size, dtype=dt)) for L in sorted(layer_ids)}
        spec = cls(base_model, base_fingerprint, hidden_size, routing or Routing(), expert_infos, layers, modules,
                   model_type=model_type)
        spec.validate()
        return spec

"""Asymmetric layer allocation: slots per layer, clustering experts by delta similarity, building the spec.

* :func:`slots_per_layer` turns a recipe's ``allocation`` (a schedule over depth groups, or a
  profile with min/max) into the number of task slots of every decoder layer.
* :func:`layer_similarity` is the cosine similarity of the experts' deltas ``s B A`` at one
  layer (all its target modules concatenated), computed from the factors without forming the
  dense deltas: ``<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))``, two r x r products.
* :func:`cluster` groups experts into ``k`` clusters (average-linkage agglomerative, deterministic).
* :func:`build_spec` merges each cluster per module (``merge.merge_factors``) and stacks the slots
  into a :class:`~mergekit_moe.moe.spec.MoeSpec`; the knowledge expert always gets its own slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..arch import layer_index
from ..lora import Adapter, LoraFactors
from .merge import merge_factors
from .spec import NULL_EXPERT, ExpertInfo, LayerSpec, ModuleLora, MoeSpec, Routing, SlotSpec

#: spec slot "method" names for our merge methods (spec.SlotSpec vocabulary)
_SLOT_METHOD = {"linear": "linear", "ties": "ties", "dare_ties": "dare", "concat": "concat"}


def _count(v: int | str, n_task: int) -> int:
    return n_task if v == "all" else max(1, min(int(v), n_task))


def slots_per_layer(n_layers: int, n_task: int, *, schedule: Sequence[int | str] | None = None, profile: str | None = None,
                    min_slots: int | str = 1, max_slots: int | str = "all") -> list[int]:
    """Task slots of each layer. ``schedule`` splits the layers into ``len(schedule)`` equal depth groups
    (layer ``l`` is in group ``l * G // n_layers``); ``profile`` ``increasing`` grows linearly from
    ``min`` at layer 0 to ``max`` at the last layer, ``constant`` uses ``max`` everywhere."""
    if n_task < 1 or n_layers < 1:
        raise ValueError("need at least one task expert and one layer")
    if schedule:
        G = len(schedule)
        return [_count(schedule[l * G // n_layers], n_task) for l in range(n_layers)]
    lo, hi = _count(min_slots, n_task), _count(max_slots, n_task)
    if profile == "increasing" and n_layers > 1:
        return [int(round(lo + (hi - lo) * l / (n_layers - 1))) for l in range(n_layers)]
    return [hi] * n_layers


def _inner(f: LoraFactors, g: LoraFactors) -> torch.Tensor:
    """Frobenius inner product of two deltas ``<s_f B_f A_f, s_g B_g A_g>`` from the factors (no dense delta)."""
    return (f.B.float().T @ g.B.float()).mul_(f.A.float() @ g.A.float().T).sum() * (f.scale * g.scale)


def layer_similarity(adapters: Sequence[Adapter], modules: Sequence[str]) -> torch.Tensor:
    """Cosine similarity (E, E) of the experts' concatenated deltas over ``modules`` (one layer)."""
    E = len(adapters)
    gram = torch.zeros(E, E, dtype=torch.float64)
    for m in modules:
        fs = [a.factors.get(m) for a in adapters]
        for i in range(E):
            for j in range(i, E):
                if fs[i] is not None and fs[j] is not None:
                    v = float(_inner(fs[i], fs[j]))
                    gram[i, j] += v
                    if i != j:
                        gram[j, i] += v
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-30), torch.zeros_like(gram)).float()


def cluster(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of E items into ``k`` clusters from a similarity (E, E).

    Deterministic: ties break towards the lowest indices; clusters are ordered by their first member.
    """
    E = sim.shape[0]
    groups = [[i] for i in range(E)]
    while len(groups) > max(1, k):
        best, pair = None, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(sim[groups[a]][:, groups[b]].mean())
                if best is None or s > best + 1e-12:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups, key=lambda g: g[0])


@dataclass
class Allocation:
    """Clusters of task experts per layer (by name), and the similarity matrices they came from."""

    clusters: dict[int, list[list[str]]]
    similarity: dict[int, torch.Tensor] = field(default_factory=dict)

    def table(self) -> list[tuple[int, int, str]]:
        """(layer, n task slots, "a+b | c") rows for the CLI report."""
        return [(L, len(cl), " | ".join("+".join(c) for c in cl)) for L, cl in sorted(self.clusters.items())]


def layer_modules(adapters: Sequence[Adapter]) -> dict[int, list[str]]:
    """Target modules of every expert, grouped by decoder layer."""
    out: dict[int, set[str]] = {}
    for a in adapters:
        for m in a.factors:
            L = layer_index(m)
            if L is None:
                raise ValueError(f"LoRA module {m} is not inside a decoder layer")
            out.setdefault(L, set()).add(m)
    return {L: sorted(ms) for L, ms in sorted(out.items())}


def allocate(task: dict[str, Adapter], slots: Sequence[int]) -> Allocation:
    """Cluster the task experts at each layer into ``slots[layer]`` groups by delta similarity."""
    names = list(task)
    adapters = [task[n] for n in names]
    clusters: dict[int, list[list[str]]] = {}
    sims: dict[int, torch.Tensor] = {}
    for L, mods in layer_modules(adapters).items():
        k = slots[L] if L < len(slots) else len(names)
        if k >= len(names):
            clusters[L] = [[n] for n in names]  # nothing to merge: skip the similarity work
            continue
        sims[L] = layer_similarity(adapters, mods)
        clusters[L] = [[names[i] for i in g] for g in cluster(sims[L], k)]
    return Allocation(clusters, sims)


def build_spec(task: dict[str, Adapter], allocation: Allocation, *, base_model: str, base_fingerprint: str, hidden_size: int,
               knowledge: Adapter | None = None, knowledge_name: str | None = None, merge_method: str = "linear",
               rank: int | None = None, density: float = 0.5, seed: int = 0, routing: Routing | None = None,
               infos: dict[str, ExpertInfo] | None = None, model_type: str | None = None, dtype=torch.float32,
               reporter=None) -> MoeSpec:
    """Stack the merged clusters (and the knowledge slot, last) into a spec with zero routers.

    ``knowledge_name`` without ``knowledge`` adds the null expert (the base itself: no ranks).
    Per module: A (R, in), B (out, R) with scales folded into B, slot_of_rank (R,), rho = 1.
    """
    infos = dict(infos or {})
    experts: dict[str, ExpertInfo] = {}
    for n in task:
        experts[n] = infos.get(n) or ExpertInfo(n)
        experts[n].role = "task"
    if knowledge_name:
        experts[knowledge_name] = infos.get(knowledge_name) or ExpertInfo(knowledge_name, source=NULL_EXPERT if knowledge is None else "")
        experts[knowledge_name].role = "knowledge"
    every = list(task.values()) + ([knowledge] if knowledge is not None else [])
    mods_by_layer = layer_modules(every)
    layers: dict[int, LayerSpec] = {}
    modules: dict[str, ModuleLora] = {}
    if reporter is not None:
        reporter.start("merge layers", total=len(mods_by_layer))
    for L, mods in mods_by_layer.items():
        groups = allocation.clusters.get(L) or [[n] for n in task]
        slots = [SlotSpec("+".join(g), list(g), "single" if len(g) == 1 else _SLOT_METHOD[merge_method]) for g in groups]
        members: list[list[tuple[str, Adapter]]] = [[(n, task[n]) for n in g] for g in groups]
        if knowledge_name:
            slots.append(SlotSpec(knowledge_name, [knowledge_name], "single" if knowledge is not None else "null"))
            members.append([(knowledge_name, knowledge)] if knowledge is not None else [])
        for m in mods:
            As, Bs, idx = [], [], []
            for s, mem in enumerate(members):
                fs = [a.factors[m] for _, a in mem if m in a.factors]
                if not fs:
                    continue  # this slot has rank 0 at this module
                # `rank` is the rank *after merging a cluster*; single experts stay exact
                many = len(mem) > 1
                A, B = merge_factors(fs, merge_method if many else "linear", rank=rank if many else None,
                                     density=density, seed=seed)
                As.append(A.to(dtype))
                Bs.append(B.to(dtype))
                idx.append(torch.full((A.shape[0],), s, dtype=torch.long))
            if As:
                A = torch.cat(As, 0).contiguous()
                modules[m] = ModuleLora(A, torch.cat(Bs, 1).contiguous(), torch.cat(idx), torch.ones(A.shape[0], dtype=dtype))
        layers[L] = LayerSpec(slots, torch.zeros(len(slots), hidden_size, dtype=torch.float32))
        if reporter is not None:
            reporter.advance("merge layers", 1)
    if reporter is not None:
        reporter.finish("merge layers")
    spec = MoeSpec(base_model, base_fingerprint, hidden_size, routing or Routing(), experts, layers, modules, model_type=model_type)
    spec.validate()
    return spec

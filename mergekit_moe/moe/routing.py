"""Routing controls for debugging, export and analysis: force a fixed mixture, record the routers.

    with force_mixture(model, {"diagnosis": 1.0}):       # expert names; weights used as given
        logits = model(**batch).logits
    with record_routing(model) as rec:
        model.generate(...)
    rec.layer_means()    # {layer: (n_slots,) mean slot weights}
    rec.expert_means()   # {layer: {expert: weight}}

Forced mixtures are in *expert* names and mapped per layer to slot weights (a slot holding several
experts gets the sum of their weights). The recorder stores per-layer slot weights; for experts, a
slot's weight is split evenly among its members (so a layer's expert weights still sum to 1).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .attach import runtime_of
from .spec import MoeSpec


def set_forced_mixture(model: nn.Module, weights: dict[str, float] | None) -> None:
    """Force every router to the fixed mixture ``weights`` (expert name -> weight), or back to learned (None)."""
    rt = runtime_of(model)
    if weights is None:
        rt.state.forced = None
        return
    rt.state.forced = {L: rt.spec.slot_weights(L, weights) for L in rt.routers}


@contextlib.contextmanager
def force_mixture(model: nn.Module, weights: dict[str, float]) -> Iterator[None]:
    """Context manager: routers return ``weights`` (expert names) inside the block."""
    rt = runtime_of(model)
    prev = rt.state.forced
    set_forced_mixture(model, weights)
    try:
        yield
    finally:
        rt.state.forced = prev


@contextlib.contextmanager
def sequence_mask(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Sequence routing reads the mean over ``mask`` (B, T) instead of the attention mask.

    For training on prompt+response batches: pass the prompt-token mask so the mixture is the
    one generation will use (mean over non-padding *prompt* tokens).
    """
    rt = runtime_of(model)
    prev = rt.state.mask_override
    rt.state.mask_override = mask
    try:
        yield
    finally:
        rt.state.mask_override = prev


class Recorder:
    """Collects each layer's mixture per forward: ``records[layer]`` = list of (pi, mask).

    ``pi`` is (B, T, S) (token), (B, 1, S) (sequence) or (1, 1, S) (forced); ``mask`` is the call's
    attention mask (B, T_total) for token routing, else None. With ``detach=False`` the tensors keep
    their autograd graph (calibration losses on routing); otherwise they are detached float32 on CPU.
    """

    def __init__(self, spec: MoeSpec, *, detach: bool = True) -> None:
        self.spec = spec
        self.detach = detach
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def add(self, layer: int, pi: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.detach:
            pi = pi.detach().float().cpu()
            mask = None if mask is None else mask.detach().cpu()
        self.records.setdefault(layer, []).append((pi, mask))

    def clear(self) -> None:
        self.records.clear()

    def weights(self) -> dict[int, torch.Tensor]:
        """The latest mixture per layer: {layer: (B, T, S) | (B, 1, S) | (1, 1, S)} (one forward's routing)."""
        return {L: recs[-1][0] for L, recs in sorted(self.records.items())}

    def slot_names(self, layer: int) -> list[str]:
        return [s.name for s in self.spec.layers[layer].slots]

    def layer_means(self) -> dict[int, torch.Tensor]:
        """Mean slot weights per layer over every recorded (non-padding) token or sequence: {layer: (S,)}."""
        out: dict[int, torch.Tensor] = {}
        for L, recs in sorted(self.records.items()):
            total, count = None, 0.0
            for pi, mask in recs:
                p = pi.float()
                if mask is not None and p.dim() == 3 and mask.shape[0] == p.shape[0] and mask.shape[1] >= p.shape[1]:
                    # token routing: skip padding (a decode step's mask covers the cache too: take its tail)
                    m = mask[:, -p.shape[1]:].to(device=p.device, dtype=torch.float32).unsqueeze(-1)   # (B, T, 1)
                    s, n = (p * m).sum((0, 1)), float(m.sum())
                else:
                    s, n = p.reshape(-1, p.shape[-1]).sum(0), float(p.reshape(-1, p.shape[-1]).shape[0])
                total = s if total is None else total + s
                count += n
            out[L] = total / max(count, 1.0)
        return out

    def expert_means(self) -> dict[int, dict[str, float]]:
        """Mean weight per expert per layer (a slot's weight split evenly among its members)."""
        out: dict[int, dict[str, float]] = {}
        for L, mean in self.layer_means().items():
            d = {e: 0.0 for e in self.spec.experts}
            for s, w in zip(self.spec.layers[L].slots, mean.tolist()):
                for e in s.members:
                    d[e] += w / len(s.members)
            out[L] = d
        return out


@contextlib.contextmanager
def record_routing(model: nn.Module, *, detach: bool = True) -> Iterator[Recorder]:
    """Context manager yielding a :class:`Recorder` that sees every router call inside the block."""
    rt = runtime_of(model)
    rec = Recorder(rt.spec, detach=detach)
    rt.state.recorders.append(rec)
    try:
        yield rec
    finally:
        rt.state.recorders.remove(rec)

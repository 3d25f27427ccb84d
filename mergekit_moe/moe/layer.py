"""The rank-wise MoE-LoRA module and the per-decoder-layer router.

Per target module (``nn.Linear`` or GPT-2 ``Conv1D``), with the slots' LoRA factors stacked along
the rank axis::

    A (R, in)   B (out, R) (slot scales folded in)   slot_of_rank (R,)   rho (R,)
    pi  = router mixture of the decoder layer         (..., S)   S = n_slots
    g   = pi[..., slot_of_rank] * rho                 (..., R)   a gather over a tiny tensor
    y   = W x + B (g * (A x))                         two skinny matmuls, no loop over experts

With ``rho = 1`` this equals ``sum_s pi_s B_s A_s x`` exactly (no cross terms ``B_s A_t``).

The router lives on the decoder layer (:class:`LayerRouter`): a forward pre-hook computes the
mixture once from the layer's input hidden state, and every target module of that layer reads it.
What the router does (token/sequence, forced mixture, recording) is decided by the shared
:class:`RoutingState` of the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .spec import Routing


class RoutingState:
    """Per-model routing state shared by all routers (set by ``attach`` hooks and ``routing`` controls).

    ``seq_mask`` (B, T) marks the tokens whose mean feeds sequence routing (non-padding prompt tokens);
    ``seq_cache`` keeps each layer's sequence mixture for the cached decode steps.
    """

    def __init__(self) -> None:
        self.forced: dict[int, torch.Tensor] | None = None  # layer -> (S,) slot weights
        self.recorders: list[Any] = []                      # routing.Recorder objects
        self.seq_mask: torch.Tensor | None = None
        self.mask_override: torch.Tensor | None = None
        self.seq_cache: dict[int, torch.Tensor] = {}
        self.freeze_seq = False   # inside generate: reuse the prompt's mixture for every step
        self.gen_started = False  # inside generate: the first forward (the prompt) has run
        self.attention_mask: torch.Tensor | None = None     # of the current model call (for recorders)


class LayerRouter(nn.Module):
    """Router of one decoder layer: ``Linear(hidden, n_slots)``, softmax with temperature, optional top-k.

    Weights are kept in float32 whatever the model dtype (they are what calibration trains); the
    mixture is cast to the hidden state's dtype. ``self.pi`` holds the current mixture:
    (B, T, S) for token routing, (B, 1, S) for sequence routing, (1, 1, S) when forced.
    """

    def __init__(self, layer: int, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing,
                 state: RoutingState) -> None:
        super().__init__()
        n_slots, hidden = weight.shape
        self.layer = layer
        self.linear = nn.Linear(hidden, n_slots, bias=bias is not None, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.linear.weight.copy_(weight.float())
            if bias is not None:
                self.linear.bias.copy_(bias.float())
        self.routing = routing
        # a plain attribute (not a submodule): the state is shared, not owned
        self.__dict__["state"] = state
        self.pi: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.linear.out_features

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        """Mixture over slots for hidden states ``h`` (..., hidden) -> (..., S), float32.

        The matmul runs in the hidden state's dtype (casting the tiny (S, hidden) weight, not the
        big (..., hidden) activations); softmax and top-k run in float32.
        """
        w, b = self.linear.weight, self.linear.bias
        if h.dtype != w.dtype:
            w, b = w.to(h.dtype), None if b is None else b.to(h.dtype)
        if h.device.type == "cpu":
            # CPU BLAS is slow for a skinny (T, hidden) x (hidden, S) product; (S, hidden) x (hidden, T) is
            # the same numbers and ~1.3-2.5x faster here (measured at hidden 2048, S 8)
            h2 = h.reshape(-1, h.shape[-1])
            logits = torch.mm(w, h2.t()).t().reshape(*h.shape[:-1], w.shape[0])
            if b is not None:
                logits = logits + b
            logits = logits.float()
        else:
            logits = F.linear(h, w, b).float()
        if self.routing.temperature != 1.0:
            logits = logits / self.routing.temperature
        k = self.routing.top_k
        if k is not None and k < self.n_slots:
            # softmax over the top-k logits only = softmax then renormalise over the top k;
            # exactly k slots even under ties (a zero-initialised router has all logits equal)
            top = logits.topk(k, dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
        return torch.softmax(logits, dim=-1)

    def compute(self, hidden: torch.Tensor) -> torch.Tensor:
        """Set and return ``self.pi`` for this layer's input ``hidden`` (B, T, hidden)."""
        st = self.state
        if st.forced is not None:
            pi = st.forced[self.layer].to(device=hidden.device, dtype=hidden.dtype).view(1, 1, -1)
            mask = None
        elif self.routing.granularity == "token":
            pi = self.probs(hidden).to(hidden.dtype)
            mask = st.attention_mask
        else:
            # the stack pre-hook clears the cache at each new sequence; decode steps reuse the prompt's mixture
            pi = st.seq_cache.get(self.layer)
            if pi is None:
                pi = self.sequence_probs(hidden, st.mask_override if st.mask_override is not None else st.seq_mask)
                st.seq_cache[self.layer] = pi
            mask = None
        for rec in st.recorders:
            rec.add(self.layer, pi, mask)
        self.pi = pi
        return pi

    def sequence_probs(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One mixture per sequence from the mean hidden state over ``mask`` (B, T') tokens -> (B, 1, S)."""
        if mask is None:
            mean = hidden.float().mean(dim=1)
        else:
            T = mask.shape[-1]
            if T > hidden.shape[1]:  # decode step without a prompt mixture: use what we have
                mask = mask[:, -hidden.shape[1]:]
                T = hidden.shape[1]
            m = mask[:, :T].to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)   # (B, T, 1)
            mean = (hidden[:, :T].float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.probs(mean).unsqueeze(1).to(hidden.dtype)

    def extra_repr(self) -> str:
        r = self.routing
        return f"layer={self.layer}, n_slots={self.n_slots}, granularity={r.granularity}, temperature={r.temperature}, top_k={r.top_k}"


class MoeLoraLinear(nn.Module):
    """Wraps a target ``nn.Linear`` / ``Conv1D`` (kept as ``base_layer``, untouched) with stacked MoE-LoRA factors.

    ``A`` (R, in) and ``B`` (out, R) are frozen; ``rho`` (R,) is a parameter (trainable in calibration).
    The forward reads the mixture ``router.pi`` computed by the layer's pre-hook.
    """

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, slot_of_rank: torch.Tensor,
                 rho: torch.Tensor, router: LayerRouter, *, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        w = _base_weight(base_layer)
        dev, dt = w.device, w.dtype if w.is_floating_point() else torch.float32
        # stacked once here so the forward makes no copies (contiguous, the model's dtype and device)
        self.A = nn.Parameter(A.to(device=dev, dtype=dt).contiguous(), requires_grad=False)
        self.B = nn.Parameter(B.to(device=dev, dtype=dt).contiguous(), requires_grad=False)
        self.rho = nn.Parameter(rho.to(device=dev, dtype=dt).clone(), requires_grad=False)
        self.register_buffer("slot_of_rank", slot_of_rank.to(device=dev, dtype=torch.long).contiguous(), persistent=False)
        self.__dict__["router"] = router  # shared with the other modules of the layer, owned by the decoder layer
        self.name = name

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.A.shape[0] == 0:
            return out
        pi = self.router.pi
        if pi is None:
            # called outside a decoder-layer forward (e.g. a unit test on the module alone)
            raise RuntimeError(f"{self.name}: no routing mixture; the decoder layer's router did not run")
        h = F.linear(x.to(self.A.dtype), self.A)                         # (..., R)
        if pi.dim() != h.dim():  # e.g. a 2-D input (N, in) with a (1, 1, S) forced mixture
            pi = pi.view(*h.shape[:-1], pi.shape[-1]) if pi.numel() // pi.shape[-1] == h.numel() // h.shape[-1] \
                else pi.reshape(-1)
        if torch.is_grad_enabled() and (self.rho.requires_grad or pi.requires_grad or x.requires_grad or out.requires_grad):
            # autograd path: out-of-place ops; g_k = pi[..., slot(k)] * rho_k
            h = h * (pi.index_select(-1, self.slot_of_rank) * self.rho)
            return out + F.linear(h, self.B).to(out.dtype)
        # inference path: gate = pi @ E with E (S, R) = rho on each rank's slot (cached): one tiny matmul
        # instead of a gather and a multiply; then B h accumulated straight into the base output with
        # addmm_ (no extra (..., out) tensor, no extra pass)
        h.mul_(pi @ self._expansion(pi.shape[-1], pi.dtype, pi.device))
        if out.dtype == h.dtype and out.is_contiguous():
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.B.t())
            return out
        return out + F.linear(h, self.B).to(out.dtype)

    def _expansion(self, n_slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """E (n_slots, R) with ``E[slot_of_rank[k], k] = rho[k]``, so that ``pi @ E`` is the gate. Cached per rho version."""
        key = (id(self.rho), self.rho._version, n_slots, dtype, device)
        if self.__dict__.get("_E_key") != key:
            R = self.rank
            E = torch.zeros(n_slots, R, dtype=dtype, device=device)
            E[self.slot_of_rank.to(device), torch.arange(R, device=device)] = self.rho.detach().to(device=device, dtype=dtype)
            self.__dict__["_E"], self.__dict__["_E_key"] = E, key
        return self.__dict__["_E"]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, slots={int(self.slot_of_rank.max()) + 1 if self.rank else 0}"


def _base_weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)
    raise TypeError(f"unsupported target module type {type(module).__name__} (nn.Linear and GPT-2 Conv1D are supported)")

"""Router initialisation: ``hidden`` (prompt hidden states), ``arrow`` (top singular vectors), ``uniform``, ``random``.

A layer's router is ``Linear(hidden, n_slots)`` on the hidden state entering the decoder layer.
Every init here produces, per layer, ``weight`` (S, hidden) and ``bias`` (S,) of the form

    logit_s(h) = gain * v_s . (h - mu_L) / sigma_L        (weight = gain v_s / sigma, bias = -weight . mu)

with ``v_s`` a unit vector for slot ``s``, ``mu_L`` the mean layer-``L`` input over probe prompts and
``sigma_L`` its typical distance from that mean. Centering removes the large shared component of
residual-stream states (otherwise it swamps every projection); dividing by ``sigma`` makes ``gain``
mean roughly "logit of a perfectly aligned input", whatever the layer's scale.

* ``hidden``: nearest-centroid rows. ``m_e`` = mean state over expert ``e``'s prompts, ``ref_e``
  = mean over its negative prompts (or, without negatives, over every expert's prompts);
  ``logit_e = gain (m_e - ref_e) . (h - (m_e + ref_e)/2) / sigma^2`` (positive minus negative,
  boundary halfway). A merged slot uses the mean of its members' rows. The null knowledge slot
  keeps logit 0: it wins for inputs near the overall mean, far from every task's prompts.
* ``arrow`` (data-free): ``v_s`` = top right singular vector of the slot's delta at the layer's
  residual-reading modules (q/k/v, gate/up), from ``sum_m A^T (B^T B) A`` (hidden x hidden). A
  singular vector has no sign; we orient it towards the slot's prompts when it has any, else
  towards the probe mean (a heuristic: calibration is what makes routing sharp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..progress import Reporter, ensure
from .spec import MoeSpec

#: modules that read the residual stream (the router's input space); o_proj/down_proj read other spaces
_READS_RESIDUAL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "gate_proj", "up_proj", "gate_up_proj", "c_fc", "w1", "w3")
#: generic probe sentences: only used for mu/sigma (scale and centering), never as task signal
PROBE_TEXTS = ["The weather is mild today.", "Please answer the question below.", "Water boils at 100 degrees Celsius.",
               "List three prime numbers.", "Summarize the following paragraph.", "What is the capital of France?",
               "A patient visited the clinic.", "Translate this sentence into French."]
DEFAULT_GAIN = 4.0


@dataclass
class LayerStats:
    """Mean ``mu`` (hidden,) and typical spread ``sigma`` (scalar) of one layer's input over probe prompts."""

    mu: torch.Tensor
    sigma: float


@torch.no_grad()
def layer_inputs(model, tokenizer, texts: Sequence[str], *, pool: str = "mean", batch_size: int = 8,
                 max_length: int = 128) -> dict[int, torch.Tensor]:
    """Pooled hidden state entering each decoder layer: {layer: (N, hidden)} float32 (base model, no MoE).

    ``pool``: ``mean`` over the text's tokens, ``last`` token, or ``tokens`` (every non-padding token:
    (N_tokens, hidden), what token-level routers see). HF's ``hidden_states[L]`` is the input of
    layer ``L`` for ``L < n_layers``.
    """
    from .routing import force_mixture
    from .attach import is_attached

    out: dict[int, list[torch.Tensor]] = {}
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [pad] for t in texts[i:i + batch_size]]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, :len(e)] = torch.tensor(e)
            mask[j, :len(e)] = 1
        kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True, use_cache=False)
        if is_attached(model):
            with force_mixture(model, {}):  # all slot weights 0: exactly the base model
                hs = model(**kw).hidden_states
        else:
            hs = model(**kw).hidden_states
        m = mask.to(dev).unsqueeze(-1).float()
        last = mask.sum(1) - 1
        n_layers = len(hs) - 1
        for L in range(n_layers):
            h = hs[L].float()
            if pool == "tokens":
                pooled = h[mask.to(dev).bool()]
            elif pool == "mean":
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
            else:
                pooled = h[torch.arange(h.shape[0]), last.to(dev)]
            out.setdefault(L, []).append(pooled.cpu())
    return {L: torch.cat(v) for L, v in out.items()}


def stats(pooled: dict[int, torch.Tensor]) -> dict[int, LayerStats]:
    """``mu`` and ``sigma`` per layer from pooled states {layer: (N, hidden)}."""
    out = {}
    for L, h in pooled.items():
        mu = h.mean(0)
        sigma = float((h - mu).norm(dim=-1).mean()) if h.shape[0] > 1 else float(h.norm(dim=-1).mean())
        out[L] = LayerStats(mu, max(sigma, 1e-6))
    return out


def _rows(vs: list[torch.Tensor | None], st: LayerStats, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = st.mu.shape[0]
    W = torch.zeros(len(vs), hidden)
    for s, v in enumerate(vs):
        if v is not None and float(v.norm()) > 0:
            W[s] = gain * v / v.norm() / st.sigma
    return W, -(W @ st.mu)


def hidden_init(spec: MoeSpec, prompt_states: dict[str, dict[int, torch.Tensor]], *, negative_states: dict[str, dict[int, torch.Tensor]] | None = None,
                gain: float = DEFAULT_GAIN, reporter: Reporter | None = None, similar_cos: float = 0.95) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Router (weight (S, hidden), bias (S,)) per layer from pooled prompt states {expert: {layer: (N, hidden)}}.

    Warns (via ``reporter``) when two experts' prompt vectors are nearly identical (mean cosine over
    layers above ``similar_cos``): their routers could not tell them apart.
    """
    rep = ensure(reporter)
    negative_states = negative_states or {}
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    names = [e for e in spec.experts if e in prompt_states]
    cos_sum: dict[tuple[str, str], float] = {}
    for L, lay in sorted(spec.layers.items()):
        allp = torch.cat([prompt_states[e][L] for e in names])
        st = stats({L: allp})[L]
        # nearest-centroid form: logit_e = gain (m_e - ref_e) . (h - (m_e + ref_e) / 2) / sigma^2,
        # i.e. positive-minus-reference direction with the decision boundary halfway between them
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        vec: dict[str, torch.Tensor] = {}
        for e in names:
            m = prompt_states[e][L].mean(0)
            ref = negative_states[e][L].mean(0) if e in negative_states else st.mu
            vec[e] = m - ref
            w = gain * vec[e] / st.sigma ** 2
            rows[e] = (w, -(w @ (m + ref)) / 2)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                c = float(torch.nn.functional.cosine_similarity(vec[a], vec[b], dim=0))
                cos_sum[(a, b)] = cos_sum.get((a, b), 0.0) + c
        W = torch.zeros(lay.n_slots, spec.hidden_size)
        bias = torch.zeros(lay.n_slots)
        for s, slot in enumerate(lay.slots):
            got = [rows[m] for m in slot.members if m in rows]
            if got:  # a merged slot answers for all its members: the mean of their rows
                W[s] = torch.stack([w for w, _ in got]).mean(0)
                bias[s] = torch.stack([b for _, b in got]).mean()
        out[L] = (W, bias)
    n = max(len(spec.layers), 1)
    for (a, b), c in sorted(cos_sum.items()):
        if c / n > similar_cos:
            rep.warn(f"experts {a!r} and {b!r} have nearly identical prompt vectors (mean cosine {c / n:.3f}): "
                     "the hidden router init cannot tell them apart; give more distinctive prompts or negative_prompts")
    return out


def _residual_modules(spec: MoeSpec, L: int) -> list[str]:
    mods = spec.modules_of_layer(L)
    picked = [m for m in mods if m.rsplit(".", 1)[-1] in _READS_RESIDUAL and spec.modules[m].A.shape[1] == spec.hidden_size]
    return picked or [m for m in mods if spec.modules[m].A.shape[1] == spec.hidden_size]


def arrow_vectors(spec: MoeSpec, L: int) -> list[torch.Tensor | None]:
    """Top right singular vector (hidden,) of each slot's delta at layer ``L`` (None for a rank-0 slot)."""
    lay = spec.layers[L]
    mods = _residual_modules(spec, L)
    out: list[torch.Tensor | None] = []
    for s in range(lay.n_slots):
        # the slot's deltas stacked vertically: blockdiag(B_m) @ [A_1; A_2; ...]. Its right singular
        # vectors live in the row space of the stacked A: QR it, then an R x R eigenproblem (R = total rank)
        As, Ks = [], []
        for m in mods:
            ml = spec.modules[m]
            cols = ml.slot_of_rank == s
            if bool(cols.any()):
                B = ml.B[:, cols].double()
                As.append(ml.A[cols].double())
                Ks.append(B.T @ B)
        if not As:
            out.append(None)
            continue
        Q, Ra = torch.linalg.qr(torch.cat(As).T)          # (hidden, R), (R, R)
        core = Ra @ torch.block_diag(*Ks) @ Ra.T           # (R, R), symmetric PSD
        _, vecs = torch.linalg.eigh(core)
        out.append((Q @ vecs[:, -1]).float())
    return out


def arrow_init(spec: MoeSpec, layer_stats: dict[int, LayerStats], *, prompt_states: dict[str, dict[int, torch.Tensor]] | None = None,
               gain: float = DEFAULT_GAIN) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Data-free router per layer from the slots' top singular vectors, centred and scaled by ``layer_stats``."""
    prompt_states = prompt_states or {}
    out = {}
    for L, lay in sorted(spec.layers.items()):
        st = layer_stats[L]
        vs = arrow_vectors(spec, L)
        for s, v in enumerate(vs):
            if v is None:
                continue
            members = [prompt_states[m][L].mean(0) - st.mu for m in lay.slots[s].members if m in prompt_states]
            ref = torch.stack(members).mean(0) if members else st.mu
            if float(v @ ref) < 0:
                vs[s] = -v
        out[L] = _rows(vs, st, gain)
    return out


def uniform_init(spec: MoeSpec) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """All-zero routers: every slot gets 1/S everywhere."""
    return {L: (torch.zeros(lay.n_slots, spec.hidden_size), torch.zeros(lay.n_slots)) for L, lay in spec.layers.items()}


def random_init(spec: MoeSpec, layer_stats: dict[int, LayerStats], *, seed: int = 0, gain: float = DEFAULT_GAIN) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Random unit directions per slot (seeded), centred and scaled like the other inits."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for L, lay in sorted(spec.layers.items()):
        vs = [torch.randn(spec.hidden_size, generator=g) for _ in lay.slots]
        out[L] = _rows(vs, layer_stats[L], gain)
    return out


def apply_router_init(spec: MoeSpec, routers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> MoeSpec:
    """Write router weights (S, hidden) and biases (S,) into ``spec`` (in place; returns it)."""
    for L, (W, b) in routers.items():
        lay = spec.layers[L]
        if tuple(W.shape) != (lay.n_slots, spec.hidden_size):
            raise ValueError(f"router init for layer {L} has shape {tuple(W.shape)}, expected ({lay.n_slots}, {spec.hidden_size})")
        lay.router_weight = W.float().contiguous()
        lay.router_bias = b.float().contiguous()
    return spec

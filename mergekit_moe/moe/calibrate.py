"""Router calibration: base and experts frozen; train the routers (and ``rho``) on a small data mix.

Each calibration example knows its source: a task expert's data, or general data (whose "expert"
is the knowledge slot). Per step, with ``pi`` the per-layer mixtures (recorded with autograd):

    loss = w_lm      * LM loss on answer tokens (every example)
         + w_routing * mean_layers CE(pooled pi, slot holding the source expert)
         + w_balance * LoRAMoE localized balance: CV^2 of the importance of each slot, weighted
                       (1 + delta) inside the example's group (task slots for task data, the
                       knowledge slot for general data) and (1 - delta) outside it
         + w_kl      * KL(base || model) on general examples (base = every slot weight 0)

Deterministic for a seed (sampling from a seeded generator, no dropout). The report carries loss
curves, routing accuracy per task on held-out rows (before and after), the mean routing weight
per task per layer, and the KL to the base on held-out general rows (before and after).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..progress import Reporter, ensure

GENERAL = "__general__"
#: the row of held-out general data in reports (routing target: the knowledge slot)
GENERAL_KEY = "(general)"
BALANCE_DELTA = 0.1
#: rho's learning rate relative to the routers'
RHO_LR_FACTOR = 0.1


@dataclass
class CalibrationReport:
    steps: int
    losses: dict[str, list[float]]                          # per step: total, lm, routing, balance, kl
    accuracy_before: dict[str, float]                       # held-out routing accuracy per task (slot level)
    accuracy_after: dict[str, float]
    mean_weight: dict[str, list[list[float]]]               # task (and "(general)") -> (layers, experts) mean weight, held out
    experts: list[str]
    layers: list[int]
    kl_general_before: float | None = None
    kl_general_after: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        acc = list(self.accuracy_after.values())
        return {"steps": self.steps, "routing_accuracy": sum(acc) / len(acc) if acc else None,
                "routing_accuracy_per_task": self.accuracy_after, "routing_accuracy_before": self.accuracy_before,
                "kl_general_before": self.kl_general_before, "kl_general_after": self.kl_general_after,
                "general_to_knowledge_before": self.extra.get("general_to_knowledge_before"),
                "general_to_knowledge_after": self.extra.get("general_to_knowledge_after"),
                "final_loss": {k: v[-1] for k, v in self.losses.items() if v}, "seconds": round(self.seconds, 2)}


@dataclass
class _Example:
    ids: list[int]
    labels: list[int]
    source: str     # expert name, or GENERAL


def _examples(rows: list[dict], tokenizer, max_length: int, source: str) -> list[_Example]:
    from ..data import tokenize_rows

    ts = tokenize_rows(rows, tokenizer, max_length)
    return [_Example(e["input_ids"], e["labels"], source) for e in ts.examples]


def _batch(exs: list[_Example], pad_id: int, dev) -> dict[str, torch.Tensor]:
    from ..data import IGNORE_INDEX, collate

    b = collate([{"input_ids": e.ids, "labels": e.labels} for e in exs], pad_id)
    attn = b["attention_mask"].bool()
    prompt = (b["labels"] == IGNORE_INDEX) & attn
    # rows without a prompt (plain text) are routed on all their tokens
    prompt = torch.where(prompt.any(1, keepdim=True), prompt, attn)
    return {k: v.to(dev) for k, v in b.items()} | {"prompt_mask": prompt.to(dev)}


def _targets(spec, sources: list[str], knowledge: str | None) -> dict[int, torch.Tensor]:
    """Target slot per example per layer (-1: no target, e.g. general data without a knowledge slot)."""
    out = {}
    for L, lay in spec.layers.items():
        where = {m: s for s, slot in enumerate(lay.slots) for m in slot.members}
        out[L] = torch.tensor([where.get(knowledge if src == GENERAL else src, -1) if (src != GENERAL or knowledge) else -1
                               for src in sources], dtype=torch.long)
    return out


def _pooled(pi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example mixture (B, S): sequence pi (B, 1, S) as is, token pi (B, T, S) averaged over ``mask``."""
    if pi.shape[1] == 1:
        return pi[:, 0].float()
    m = mask[:, -pi.shape[1]:].float().unsqueeze(-1)
    return (pi.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _forward(model, batch, granularity: str, *, detach: bool):
    from .routing import record_routing, sequence_mask

    ctx = sequence_mask(model, batch["prompt_mask"]) if granularity == "sequence" else contextlib.nullcontext()
    with record_routing(model, detach=detach) as rec, ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits, {L: recs[-1][0] for L, recs in rec.records.items()}


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _kl_to_base(model, batch, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(base || model) over the ``rows`` (general examples), non-padding tokens."""
    from .routing import force_mixture

    with torch.no_grad(), force_mixture(model, {}):
        base = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows], use_cache=False).logits
    lp, lq = F.log_softmax(base.float(), -1), F.log_softmax(logits[rows].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = batch["attention_mask"][rows].float()
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def _balance(pis: dict[int, torch.Tensor], mask: torch.Tensor, sources: list[str], spec, knowledge: str | None) -> torch.Tensor:
    """LoRAMoE localized balancing: CV^2 of the group-weighted importance of the slots, mean over layers."""
    is_general = torch.tensor([s == GENERAL for s in sources], device=mask.device)
    losses = []
    for L, pi in pis.items():
        p = _pooled(pi, mask)                                      # (B, S)
        lay = spec.layers[L]
        kslot = next((s for s, sl in enumerate(lay.slots) if knowledge in sl.members), None) if knowledge else None
        rows = []
        for group in (False, True):
            sel = is_general == group
            if not bool(sel.any()):
                continue
            q = p[sel].mean(0)                                     # importance of each slot for this group (S,)
            z = torch.full_like(q, 1 - BALANCE_DELTA if group else 1 + BALANCE_DELTA)
            if kslot is not None:
                z[kslot] = 1 + BALANCE_DELTA if group else 1 - BALANCE_DELTA
            rows.append(q * z)
        zq = torch.cat(rows)
        losses.append(zq.var(unbiased=False) / zq.mean().clamp_min(1e-9) ** 2)
    return torch.stack(losses).mean()


def _routing_loss(pis, targets, mask) -> torch.Tensor:
    losses = []
    for L, pi in pis.items():
        t = targets[L].to(pi.device)
        keep = t >= 0
        if bool(keep.any()):
            p = _pooled(pi, mask)[keep]
            losses.append(F.nll_loss(p.clamp_min(1e-9).log(), t[keep]))
    return torch.stack(losses).mean() if losses else torch.zeros(())


@torch.no_grad()
def evaluate_routing(model, tokenizer, spec, held_out: dict[str, list[dict]], *, knowledge: str | None, max_length: int,
                     granularity: str, batch_size: int = 16, reporter: Reporter | None = None,
                     label: str = "held-out routing") -> tuple[dict[str, float], dict[str, list[list[float]]]]:
    """Slot-level routing accuracy per task and mean expert weight (layers, experts) per task on held-out rows."""
    rep = ensure(reporter)
    pad = tokenizer.pad_token_id or 0
    dev = next(model.parameters()).device
    acc, weights = {}, {}
    experts = list(spec.experts)
    layers = sorted(spec.layers)
    # general rows (key GENERAL_KEY) are scored against the knowledge slot
    sets = {task: _examples(rows, tokenizer, max_length, GENERAL if task == GENERAL_KEY else task)
            for task, rows in held_out.items()}
    rep.start(label, total=sum(len(e) for e in sets.values()))
    for task, exs in sets.items():
        if not exs:
            continue
        hits, total = 0, 0
        wsum = torch.zeros(len(layers), len(experts))
        for i in range(0, len(exs), batch_size):
            chunk = exs[i:i + batch_size]
            batch = _batch(chunk, pad, dev)
            _, pis = _forward(model, batch, granularity, detach=True)
            tg = _targets(spec, [e.source for e in chunk], knowledge)
            mask = batch["prompt_mask"] if granularity == "sequence" else batch["attention_mask"]
            for li, L in enumerate(layers):
                p = _pooled(pis[L], mask.cpu()).cpu()
                t = tg[L]
                keep = t >= 0
                hits += int((p.argmax(-1)[keep] == t[keep]).sum())
                total += int(keep.sum())
                for s, slot in enumerate(spec.layers[L].slots):
                    for m in slot.members:  # a merged slot's weight is split among its members
                        wsum[li, experts.index(m)] += float(p[:, s].sum()) / len(slot.members)
            rep.advance(label, len(chunk))
        acc[task] = hits / max(total, 1)
        weights[task] = (wsum / len(exs)).tolist()
    rep.finish(label)
    return acc, weights


@torch.no_grad()
def general_kl(model, tokenizer, rows: list[dict], *, max_length: int, granularity: str, batch_size: int = 16,
               reporter: Reporter | None = None, label: str = "KL to base") -> float | None:
    """Mean per-token KL(base || model) on general rows (None without rows)."""
    rep = ensure(reporter)
    exs = _examples(rows, tokenizer, max_length, GENERAL)
    if not exs:
        return None
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    rep.start(label, total=len(exs))
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        batch = _batch(chunk, tokenizer.pad_token_id or 0, dev)
        logits, _ = _forward(model, batch, granularity, detach=True)
        rows_ = torch.ones(len(chunk), dtype=torch.bool, device=dev)
        tot += float(_kl_to_base(model, batch, logits, rows_)) * len(chunk)
        n += len(chunk)
        rep.advance(label, len(chunk))
    rep.finish(label)
    return tot / n


def calibrate(model, tokenizer, *, task_rows: dict[str, list[dict]], held_out: dict[str, list[dict]], general_rows: list[dict],
              general_held_out: list[dict], cfg, knowledge: str | None, reporter: Reporter | None = None) -> CalibrationReport:
    """Train the attached model's routers (and rho) in place; ``cfg`` is a ``recipe.CalibrationSpec``."""
    from .attach import moe_parameters, runtime_of

    rep = ensure(reporter)
    t0 = time.perf_counter()
    spec = runtime_of(model).spec
    gran = spec.routing.granularity
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pools = {n: _examples(r, tokenizer, cfg.max_length, n) for n, r in task_rows.items()}
    pools = {n: p for n, p in pools.items() if p}
    general = _examples(general_rows, tokenizer, cfg.max_length, GENERAL) if general_rows else []
    if not pools:
        from ..errors import DataError

        raise DataError("no calibration examples left after tokenization", where="calibration",
                        hint="check each expert's data rows and calibration.max_length")
    kw = dict(knowledge=knowledge, max_length=cfg.max_length, granularity=gran)
    was_training = model.training
    model.eval()  # no dropout: calibration is deterministic
    evalsets = dict(held_out)
    if general_held_out and knowledge:
        evalsets[GENERAL_KEY] = general_held_out
    acc0, _ = evaluate_routing(model, tokenizer, spec, evalsets, **kw, reporter=rep, label="held-out routing, before")
    kl0 = (general_kl(model, tokenizer, general_held_out, max_length=cfg.max_length, granularity=gran, reporter=rep,
                      label="KL to base, before") if general_held_out else None)
    params = moe_parameters(model, rho=cfg.train_rho)
    rho_ids = {id(m.rho) for m in runtime_of(model).modules.values()}
    # rho rescales whole experts: a smaller step than the routers' keeps it near 1 unless the data insists
    groups = [{"params": [p for p in params if id(p) not in rho_ids], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in rho_ids], "lr": cfg.lr * RHO_LR_FACTOR}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    w = cfg.loss_weights
    n_gen = int(round(cfg.batch_size * cfg.general_fraction)) if general else 0
    n_task = max(1, cfg.batch_size - n_gen)
    names = sorted(pools)
    losses: dict[str, list[float]] = {k: [] for k in ("total", "lm", "routing", "balance", "kl")}
    pad = tokenizer.pad_token_id or 0
    dev = next(model.parameters()).device
    rep.start("calibrate", total=cfg.steps)
    try:
        for step in range(cfg.steps):
            # balanced over experts: example j of the batch comes from expert (step * n + j) mod E
            exs = []
            for j in range(n_task):
                pool = pools[names[(step * n_task + j) % len(names)]]
                exs.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
            exs += [general[int(i)] for i in torch.randint(len(general), (n_gen,), generator=gen)] if n_gen else []
            batch = _batch(exs, pad, dev)
            sources = [e.source for e in exs]
            logits, pis = _forward(model, batch, gran, detach=False)
            mask = batch["prompt_mask"] if gran == "sequence" else batch["attention_mask"]
            gen_rows = torch.tensor([s == GENERAL for s in sources], device=dev)
            # LM loss on task examples only: on general data the KL term says what "right" is (the base)
            task_labels = batch["labels"].masked_fill(gen_rows.unsqueeze(1), -100)
            parts = {"lm": _lm_loss(logits, task_labels),
                     "routing": _routing_loss(pis, _targets(spec, sources, knowledge), mask),
                     "balance": _balance(pis, mask, sources, spec, knowledge)}
            parts["kl"] = _kl_to_base(model, batch, logits, gen_rows) if bool(gen_rows.any()) else torch.zeros((), device=dev)
            total = sum(float(w.get(k, 0.0)) * v for k, v in parts.items())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses["total"].append(float(total.detach()))
            for k, v in parts.items():
                losses[k].append(float(v.detach()))
            rep.advance("calibrate", 1, loss=losses["total"][-1], route=losses["routing"][-1])
    finally:
        rep.finish("calibrate")
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    model.eval()
    acc1, weights = evaluate_routing(model, tokenizer, spec, evalsets, **kw, reporter=rep, label="held-out routing, after")
    kl1 = (general_kl(model, tokenizer, general_held_out, max_length=cfg.max_length, granularity=gran, reporter=rep,
                      label="KL to base, after") if general_held_out else None)
    g0, g1 = acc0.pop(GENERAL_KEY, None), acc1.pop(GENERAL_KEY, None)
    return CalibrationReport(cfg.steps, losses, acc0, acc1, weights, list(spec.experts), sorted(spec.layers), kl0, kl1,
                             time.perf_counter() - t0, extra={"general_to_knowledge_before": g0, "general_to_knowledge_after": g1})


def write_report(report: CalibrationReport, out_dir) -> list[str]:
    """``calibration.json``, ``loss_curves.png`` and ``routing_heatmap.png`` into ``out_dir``; returns the file names."""
    from pathlib import Path

    from ..atomic import atomic_write_json
    from ..eval_plots import routing_heatmap
    from ..plots import save_line_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "calibration.json", {"summary": report.summary(), "losses": report.losses,
                                                 "mean_weight": report.mean_weight, "experts": report.experts,
                                                 "layers": report.layers})
    save_line_plot({k: [[i, v] for i, v in enumerate(vals)] for k, vals in report.losses.items() if vals},
                   out / "loss_curves.png", title="router calibration", xlabel="step", ylabel="loss")
    files = ["calibration.json", "loss_curves.png"]
    if report.mean_weight:
        acc = report.summary()["routing_accuracy"]
        routing_heatmap({"experts": report.experts, "layers": report.layers, "mean_weight": report.mean_weight,
                         "accuracy": acc}, out / "routing_heatmap.png")
        files.append("routing_heatmap.png")
    return files

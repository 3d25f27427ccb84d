"""``moemerge eval``: per-task metrics, general-knowledge retention and routing analysis of one target.

Flow: rows (same formats as training data) -> greedy batched generation with the tokenizer's chat
template (the exact prompt text training used, ``data.format_prompt``) -> per-task primary metric
(accuracy on a fixed label set, else ROUGE-L; chosen from the gold answers, see ``metrics``) ->
per-token loss on the answer tokens -> retention on general probes (rows of task ``general`` or a
probe file): share of the probes the base answers correctly that the target still answers, and
KL(base || target) / perplexity ratio on the general rows -> routing weights per task and layer
(composed checkpoints). Outputs (scores.json, predictions.jsonl, PNGs) are written atomically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as M
from .data import format_prompt
from .eval_data import load_eval_rows  # noqa: F401  (re-exported: the CLI and benchmarks load rows here)
from .eval_passes import general_shift, generate, row_losses
from .eval_target import Target
from .progress import Reporter, ensure

SCORES_JSON = "scores.json"
PREDICTIONS_JSONL = "predictions.jsonl"
RESULT_FORMAT_VERSION = 1


@dataclass
class EvalConfig:
    """Evaluation settings (CLI flags)."""

    metric_overrides: dict[str, str] = field(default_factory=dict)   # task -> accuracy | rougeL | exact_match
    max_new_tokens: int | None = None     # None: per task, the longest gold answer in tokens + margin
    new_token_margin: int = 8
    max_new_tokens_cap: int = 256
    batch_size: int = 16                  # generation batch (left padding)
    loss_batch_size: int = 8              # teacher-forced batches (full-vocab logits are large)
    max_length: int = 512                 # prompt + answer tokens
    general_task: str = "general"         # rows of this task are the retention probes
    #: probes get at least this many new tokens: a chatty base model states the answer after a preamble,
    #: and retention is only defined on probes the base answers
    probe_min_new_tokens: int = 48
    retention: bool = True
    correct_threshold: float = M.CORRECT_ROUGE


@dataclass
class EvalResult:
    """Everything ``moemerge eval`` reports; ``to_json`` is what scores.json holds."""

    target: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    retention: dict[str, Any] | None
    routing: dict[str, Any] | None
    predictions: list[dict[str, Any]]
    settings: dict[str, Any]
    wall_time_s: float

    @property
    def average(self) -> float | None:
        """Mean primary score over the task (non-general) rows' tasks."""
        gen = self.settings.get("general_task")
        return M.mean([t["score"] for name, t in self.tasks.items() if name != gen])

    def to_json(self) -> dict[str, Any]:
        return {"format_version": RESULT_FORMAT_VERSION, "target": self.target, "tasks": self.tasks,
                "average": self.average, "retention": self.retention, "routing": self.routing,
                "settings": self.settings, "wall_time_s": round(self.wall_time_s, 2)}


# ------------------------------------------------------------------------------ orchestration
def _max_new(rows: list[dict], tok, cfg: EvalConfig, *, probes: bool = False) -> int:
    """Generation budget of a task: --max-new-tokens, else its longest gold answer + margin (probes: a floor)."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    longest = max(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
    n = longest + cfg.new_token_margin
    return min(cfg.max_new_tokens_cap, max(n, cfg.probe_min_new_tokens) if probes else n)


def evaluate(target: Target, rows: list[dict], cfg: EvalConfig | None = None, *, reporter: Reporter | None = None,
             data_label: str = "", reference: dict[str, list[str]] | None = None) -> EvalResult:
    """Evaluate ``target`` on normalized rows (``eval_data.load_eval_rows``). See the module docstring.

    ``reference``: more gold answers per task (``eval_data.reference_answers``: the training split) that
    join the evaluation golds when choosing each task's metric and label set.
    """
    reference = reference or {}
    cfg = cfg or EvalConfig()
    rep = ensure(reporter)
    t0 = time.perf_counter()
    tok = target.tokenizer
    tasks: dict[str, list[dict]] = {}
    for r in rows:
        tasks.setdefault(str(r["task"]), []).append(r)
    unknown = sorted(set(cfg.metric_overrides) - set(tasks))
    if unknown:
        from .errors import EvalError

        raise EvalError(f"--metric names unknown task(s) {', '.join(unknown)}", hint=f"tasks in the data: {', '.join(tasks)}")
    gen_rows = [r for r in rows if "response" in r]
    routing_acc: dict | None = {} if target.has_routing else None

    preds: dict[int, str] = {}
    rep.start("generate", total=len(gen_rows))
    for name, trows in tasks.items():
        qa = [r for r in trows if "response" in r]
        if qa:
            budget = _max_new(qa, tok, cfg, probes=name == cfg.general_task)
            outs = generate(target.model, tok, qa, max_new_tokens=budget, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, reporter=rep)
            preds.update({id(r): p for r, p in zip(qa, outs)})
    rep.finish("generate")

    rep.start("loss", total=len(rows))
    losses = dict(zip(map(id, rows), row_losses(target, rows, cfg, routing_acc, rep)))
    rep.finish("loss")

    task_scores: dict[str, dict[str, Any]] = {}
    pred_rows: list[dict[str, Any]] = []
    flags: dict[int, bool] = {}
    for name, trows in tasks.items():
        qa = [r for r in trows if "response" in r]
        nll = sum(losses[id(r)][0] for r in trows)
        ntok = sum(losses[id(r)][1] for r in trows)
        entry: dict[str, Any] = {"n": len(qa), "loss": nll / ntok if ntok else None, "n_loss_tokens": ntok}
        if qa:
            metric, labels = M.choose_metric([r["response"] for r in qa] + list(reference.get(name, [])),
                                             cfg.metric_overrides.get(name))
            scores, rouges, ems = [], [], []
            for r in qa:
                p = preds[id(r)]
                s = M.score_prediction(p, r["response"], metric, labels)
                rg, em = M.rouge_l(p, r["response"]), M.exact_match(p, r["response"])
                flags[id(r)] = M.is_correct(p, r["response"], metric, labels, cfg.correct_threshold)
                scores.append(s), rouges.append(rg), ems.append(em)
                pr = {"id": r["id"], "task": name, "prompt": format_prompt(r, tok), "prediction": p, "gold": r["response"],
                      "metric": metric, "score": s, "rougeL": rg, "exact_match": em, "correct": flags[id(r)],
                      "loss": losses[id(r)][0] / max(1, losses[id(r)][1])}
                if labels is not None:
                    pr["pred_label"], pr["gold_label"] = labels.extract(p), labels.gold_label(r["response"])
                pred_rows.append(pr)
            entry.update(metric=metric, score=M.mean(scores), rougeL=M.mean(rouges), exact_match=M.mean(ems),
                         labels=list(labels.labels) if labels is not None else None,
                         label_mode=labels.mode if labels is not None else None)
        else:
            entry.update(metric=None, score=None, rougeL=None, exact_match=None, labels=None, label_mode=None)
        task_scores[name] = entry

    retention = None
    probes = [r for r in tasks.get(cfg.general_task, []) if "response" in r]
    if cfg.retention and cfg.general_task in tasks:
        retention = _retention(target, tasks[cfg.general_task], probes, preds, flags, cfg, rep,
                               list(reference.get(cfg.general_task, [])))
    elif cfg.retention:
        rep.warn(f"no rows of task {cfg.general_task!r}: retention skipped (add general probes or pass --probe FILE)")

    tagged: dict[str, set] = {}
    for r in rows:
        if r.get("expert"):
            tagged.setdefault(str(r["task"]), set()).add(r["expert"])
    routing = _routing_summary(target, routing_acc, tagged) if routing_acc is not None else None
    tinfo = {"kind": target.kind, "name": target.name, "base_model": target.base_ref, "adapter_params": target.adapter_params}
    settings = {"data": data_label, "reference_answers": {t: len(v) for t, v in reference.items()},
                "general_task": cfg.general_task, "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens, "metric_overrides": dict(cfg.metric_overrides), "decoding": "greedy",
                "correct_threshold": cfg.correct_threshold}
    return EvalResult(tinfo, task_scores, retention, routing, pred_rows, settings, time.perf_counter() - t0)


def _retention(target: Target, grows: list[dict], probes: list[dict], preds: dict, flags: dict,
               cfg: EvalConfig, rep: Reporter, reference: list[str]) -> dict[str, Any]:
    """Probe retention (base answers under ``base_mode``) and KL/perplexity shift on the general rows."""
    if target.kind == "base":  # the base against itself: nothing can shift
        r = M.retention([flags[id(p)] for p in probes], [flags[id(p)] for p in probes])
        return {**r.to_dict(), "kl": 0.0, "ppl_ratio": 1.0, "base_ppl": None, "target_ppl": None, "n_tokens": 0}
    # the same metric and label set the task scoring chose for these rows
    metric, labels = M.choose_metric([p["response"] for p in probes] + reference or ["x"],
                                     cfg.metric_overrides.get(cfg.general_task))
    base_flags: list[bool] = []
    if probes:
        rep.start("base probes", total=len(probes))
        with target.base_mode():
            outs = generate(target.model, target.tokenizer, probes,
                            max_new_tokens=_max_new(probes, target.tokenizer, cfg, probes=True),
                            batch_size=cfg.batch_size, max_length=cfg.max_length, reporter=rep, task="base probes")
        rep.finish("base probes")
        base_flags = [M.is_correct(o, p["response"], metric, labels, cfg.correct_threshold) for o, p in zip(outs, probes)]
    r = M.retention(base_flags, [flags[id(p)] for p in probes])
    rep.start("general shift", total=len(grows))
    shift = general_shift(target, grows, cfg, rep)
    rep.finish("general shift")
    return {**r.to_dict(), **shift}


def _routing_summary(target: Target, acc: dict, acc_experts: dict[str, set]) -> dict[str, Any]:
    """Mean expert weight per task per layer, and routing accuracy (argmax expert == the row's expert)."""
    import torch

    names = list(target.spec.experts)
    layers = sorted({L for per in acc.values() for L in per})
    mean_w: dict[str, list[list[float]]] = {}
    per_task_acc: dict[str, float] = {}
    for task, per in acc.items():
        stack = torch.stack([torch.stack(per[L]) for L in layers])  # (layers, rows, experts)
        mean_w[task] = stack.mean(1).tolist()
        # the row's expert: named by the recipe the rows came from, else the expert serving this task
        tagged = {r for r in acc_experts.get(task, ()) if r in names}
        own = sorted(tagged) or [n for n in names if target.expert_tasks.get(n) == task]
        if own:
            choice = stack.mean(0).argmax(-1)  # per row: the expert with the most weight over all layers
            per_task_acc[task] = float(sum(names[int(c)] in own for c in choice) / len(choice))
    n = {t: len(next(iter(acc[t].values()))) for t in per_task_acc}
    total = sum(n.values())
    accuracy = sum(per_task_acc[t] * n[t] for t in per_task_acc) / total if total else None
    return {"experts": names, "expert_tasks": {k: target.expert_tasks[k] for k in names}, "layers": layers,
            "mean_weight": mean_w, "accuracy": accuracy, "per_task_accuracy": per_task_acc}


def write_outputs(result: EvalResult, out_dir: str | os.PathLike, *, overwrite: bool = True) -> dict[str, Path]:
    """Write scores.json, predictions.jsonl and the PNGs into ``out_dir`` atomically; returns the paths."""
    import json

    from .atomic import dump_json, staging_dir
    from .eval_plots import routing_heatmap, task_scores_plot

    out = Path(out_dir)
    with staging_dir(out, overwrite=overwrite) as stage:
        (stage / SCORES_JSON).write_text(dump_json(result.to_json()), encoding="utf-8")
        with open(stage / PREDICTIONS_JSONL, "w", encoding="utf-8") as fh:
            for p in result.predictions:
                fh.write(json.dumps(p, ensure_ascii=False) + "\n")
        task_scores_plot(result.tasks, stage / "task_scores.png", title=result.target["name"])
        if result.routing:
            routing_heatmap(result.routing, stage / "routing_heatmap.png")
    names = [SCORES_JSON, PREDICTIONS_JSONL, "task_scores.png"] + (["routing_heatmap.png"] if result.routing else [])
    return {n: out / n for n in names}

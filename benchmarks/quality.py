#!/usr/bin/env python
"""Quality benchmark: one recipe, every system built and evaluated side by side.

Systems (all on the recipe's base model, evaluated with ``moemerge eval`` on the recipe's data at ``--split``):

* ``base``       the bare base model
* ``expert:X``   each trained expert alone (a PEFT LoRA)
* ``multitask``  one LoRA trained on all the experts' training data, rank = sum of the experts' ranks
                 (same parameter budget), steps = sum of their steps, same other hyperparameters
* ``linear`` / ``ties``  a single merged LoRA (``moemerge compose --method linear|ties``)
* ``topk``       conventional top-k MoE: hard routing, every expert separate in every layer, no knowledge expert
* ``moe``        Med-MoE-LoRA as the recipe says (rank-wise soft merge, allocation, knowledge expert, calibration)
* ``oracle``     each task answered by its own expert (general rows by the knowledge expert, else the base)

Writes a markdown report (default ``docs/results.md``) with the table, a plot, and the commands to
reproduce it; every system's scores.json / predictions.jsonl go under ``--work``.

    python benchmarks/quality.py recipes/demo.yaml               # the real run (takes a while on CPU)
    python benchmarks/quality.py --quick                          # tiny random model, a few rows: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL_SYSTEMS = ("base", "experts", "multitask", "linear", "ties", "topk", "moe", "oracle")
MULTITASK_NAME = "bench-multitask"


def quick_recipe(work: Path) -> Path:
    """A tiny recipe over the demo data: random 4-layer Llama, 3 task experts + a general expert, few steps."""
    from mergekit_moe.tiny import build_tiny_model

    base = work / "tiny-base"
    if not (base / "config.json").exists():
        build_tiny_model(base, arch="llama", seed=0)
    data = REPO / "recipes" / "data"
    train = "{{data: {d}, rank: 4, alpha: 8, max_steps: 8, batch_size: 4, max_length: 512, lr: 0.005, eval_every: 0, save_every: 0}}"
    experts = "\n".join(f"  - name: {t}\n    train: " + train.format(d=data / t) for t in ("diagnosis", "report_summary", "ddi"))
    text = f"""base_model: {base}
experts:
{experts}
knowledge_expert:
  name: general
  train: {train.format(d=data / 'general')}
allocation: {{schedule: [2, all], merge_method: linear}}
routing: {{granularity: sequence, init: hidden}}
calibration: {{general_data: {data / 'general'}, steps: 4, batch_size: 4, max_length: 512, max_rows_per_expert: 16}}
output: {{path: {work / 'ckpt' / 'moe'}, overwrite: true}}
"""
    path = work / "quick-recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _base_ref(recipe) -> str:
    p = recipe.resolve_path(recipe.base_model)
    return str(p) if p.exists() else recipe.base_model


def train_experts(recipe, registry, rep) -> dict[str, dict]:
    """Train (or reuse) every expert with a ``train:`` block; resolve ``source`` experts. name -> info."""
    from mergekit_moe.bundle import read_bundle
    from mergekit_moe.compose import resolve_source
    from mergekit_moe.train import train_recipe

    out: dict[str, dict] = {}
    if any(e.train for e in recipe.experts) or (recipe.knowledge_expert and recipe.knowledge_expert.train):
        for r in train_recipe(recipe, registry=registry, reporter=rep):
            meta = read_bundle(r.bundle_dir).meta
            out[r.name] = {"path": Path(r.bundle_dir), "task": meta.task, "train_s": float(r.metrics.get("wall_time_s") or 0),
                           "skipped": r.skipped}
    specs = list(recipe.experts) + ([recipe.knowledge_expert] if recipe.knowledge_expert else [])
    for e in specs:
        if e.name not in out and e.source:
            path, _ = resolve_source(e, recipe, registry, rep)
            task = (read_bundle(path).meta.task if (Path(path) / "expert.json").exists() else e.name)
            out[e.name] = {"path": Path(path), "task": task, "train_s": 0.0, "skipped": True}
    if recipe.knowledge_expert and recipe.knowledge_expert.name in out:
        out[recipe.knowledge_expert.name]["knowledge"] = True
    return out


def train_multitask(recipe, registry, work: Path, rep) -> tuple[Path, float]:
    """One LoRA on the union of every trained expert's data, with the experts' total rank and steps."""
    from mergekit_moe.data import load_rows
    from mergekit_moe.train import TrainConfig, expert_signature, find_up_to_date, resolve_data, train_expert

    specs = [e for e in list(recipe.experts) + [recipe.knowledge_expert] if e is not None and e.train]
    if not specs:
        raise SystemExit("multitask baseline needs experts with `train:` blocks (their data)")
    cfgs = [TrainConfig.from_dict(dict(e.train)) for e in specs]
    rows = {"train": [], "validation": []}
    for e, c in zip(specs, cfgs):
        tr, va = resolve_data(c, recipe.root)
        rows["train"] += load_rows(tr, task=c.task or e.name)
        if va is not None:
            rows["validation"] += load_rows(va, task=c.task or e.name)
    ddir = work / "multitask-data"
    ddir.mkdir(parents=True, exist_ok=True)
    keys = ("id", "task", "prompt", "response", "messages", "text")
    for split, rs in rows.items():
        if rs:
            text = "".join(json.dumps({k: r[k] for k in keys if k in r and not (k == "response" and "messages" in r)}) + "\n"
                           for r in rs)
            if not (ddir / f"{split}.jsonl").exists() or (ddir / f"{split}.jsonl").read_text(encoding="utf-8") != text:
                (ddir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    rank = sum(c.rank for c in cfgs)
    steps = sum(c.max_steps for c in cfgs) if all(c.max_steps for c in cfgs) else None
    cfg = dataclasses.replace(cfgs[0], data=str(ddir), validation_data=None, task="multitask", rank=rank,
                              alpha=cfgs[0].alpha * rank / cfgs[0].rank, max_steps=steps)
    base = _base_ref(recipe)
    entry = find_up_to_date(registry, MULTITASK_NAME, expert_signature(base, cfg))
    if entry is not None:
        rep.info(f"{MULTITASK_NAME}: up to date in the registry, training skipped")
        from mergekit_moe.bundle import read_bundle

        return Path(entry.path), float(read_bundle(entry.path).meta.metrics.get("wall_time_s") or 0)
    res = train_expert(base, cfg, name=MULTITASK_NAME, task="multitask", registry=registry, reporter=rep)
    return Path(res.bundle_dir), float(res.metrics.get("wall_time_s") or 0)


def build_composed(recipe, method: str, work: Path, registry, experts: dict, rep) -> tuple[Path, float]:
    """Compose the recipe with ``method`` into ``work/ckpt/<method>``; returns (checkpoint, seconds)."""
    from mergekit_moe.compose import compose

    r = copy.deepcopy(recipe)
    r.output = dataclasses.replace(r.output, path=str(work / "ckpt" / method), overwrite=True)
    # use the bundles trained above (same content) instead of letting compose train inline experts again
    for e in list(r.experts) + ([r.knowledge_expert] if r.knowledge_expert else []):
        if e.train and e.name in experts:
            e.data = e.calibration_data
            e.source, e.train = str(experts[e.name]["path"]), None
    if method == "topk":  # conventional MoE: separate experts everywhere, hard routing, no knowledge expert
        r.knowledge_expert, r.knowledge = None, False
        r.allocation = dataclasses.replace(r.allocation, schedule=["all"], profile=None)
    t = time.perf_counter()
    res = compose(r, method=method, registry=registry, reporter=rep, overwrite=True)
    return Path(res.output), time.perf_counter() - t


def summarize(res, build_s: float) -> dict:
    j = res.to_json()
    ret = j["retention"] or {}
    return {"tasks": {t: v["score"] for t, v in j["tasks"].items()}, "metrics": {t: v["metric"] for t, v in j["tasks"].items()},
            "average": j["average"], "retention": ret.get("share"), "kl": ret.get("kl"), "ppl_ratio": ret.get("ppl_ratio"),
            "params": j["target"]["adapter_params"], "build_s": build_s, "eval_s": j["wall_time_s"],
            "routing_accuracy": (j["routing"] or {}).get("accuracy")}


def oracle(systems: dict, experts: dict, general_task: str) -> dict:
    """Each task scored by its own expert; general rows by the knowledge expert (else the base)."""
    by_task = {info["task"]: f"expert:{n}" for n, info in experts.items() if not info.get("knowledge")}
    know = next((f"expert:{n}" for n, i in experts.items() if i.get("knowledge")), "base")
    tasks = next(iter(systems.values()))["tasks"]
    scores = {t: systems[by_task[t]]["tasks"][t] if t in by_task and by_task[t] in systems else None for t in tasks}
    if general_task in tasks and know in systems:
        scores[general_task] = systems[know]["tasks"][general_task]
    task_scores = [v for t, v in scores.items() if t != general_task and v is not None]
    k = systems.get(know, {})
    return {"tasks": scores, "metrics": next(iter(systems.values()))["metrics"],
            "average": sum(task_scores) / len(task_scores) if task_scores else None,
            "retention": k.get("retention", 1.0), "kl": k.get("kl", 0.0), "ppl_ratio": k.get("ppl_ratio", 1.0),
            "params": sum(systems[f"expert:{n}"]["params"] for n in experts if f"expert:{n}" in systems),
            "build_s": sum(i["train_s"] for i in experts.values()), "eval_s": None, "routing_accuracy": 1.0}


def _f(v, nd=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_report(systems: dict, out: Path, *, recipe_path: Path, argv: list[str], split: str, limit, n_rows: int,
                 general_task: str, plot: Path) -> str:
    import torch

    tasks = sorted({t for s in systems.values() for t in s["tasks"] if t != general_task})
    metrics = next(iter(systems.values()))["metrics"]
    head = ["system", *[f"{t} ({metrics.get(t)})" for t in tasks], "task avg", f"{general_task} ({metrics.get(general_task)})",
            "retention", "KL(base‖sys)", "ppl ratio", "routing acc", "params", "build s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in systems.items():
        cells = [name, *[_f(s["tasks"].get(t)) for t in tasks], _f(s["average"]), _f(s["tasks"].get(general_task)),
                 _f(s["retention"]), _f(s["kl"], 4), _f(s["ppl_ratio"]), _f(s["routing_accuracy"]),
                 f"{s['params']:,}", _f(s["build_s"], 1), _f(s["eval_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    ranking = sorted((s["average"], n) for n, s in systems.items() if s["average"] is not None)[::-1]
    cmd = "python benchmarks/quality.py " + " ".join(argv)
    text = f"""# Quality benchmark results

Generated by `benchmarks/quality.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
({platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}).

* recipe: `{recipe_path}`; evaluation split `{split}`; {n_rows} rows{f' (at most {limit} per task)' if limit else ''}
* per-task score: accuracy on the extracted label (fixed label sets) or ROUGE-L F1 (free text), chosen from the gold
  answers; `task avg` averages the task columns (not `{general_task}`)
* retention: of the `{general_task}` probes the base answers correctly, the share the system still answers correctly;
  KL(base‖system) per answer token and perplexity ratio system/base on the `{general_task}` rows
* params: trainable-delta parameters on top of the base (LoRA factors, routers, rho); build s: training or composing
  (experts: their training time; oracle: all experts' training), eval s: the evaluation run

{chr(10).join(lines)}

Ranking by task average: {', '.join(f'{n} ({a:.3f})' for a, n in ranking)}.

![scores by system]({plot.name})

## Reproduce

```
{cmd}
```

Each system's `scores.json`, `predictions.jsonl` (id, task, prompt, prediction, gold, score) and plots are under the
work directory; any score can be recomputed from the predictions with `mergekit_moe.metrics`. The same steps by hand:

```
moemerge train {recipe_path}                          # every expert with a train: block
moemerge compose {recipe_path} --method linear|ties|topk|moe
moemerge eval CHECKPOINT_OR_EXPERT --data {recipe_path} --split {split}
moemerge eval --base BASE --data {recipe_path} --split {split}
```
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", help="recipe YAML (omit with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny random model and a few rows per task: a smoke test")
    ap.add_argument("--work", default=None, help="work directory [bench_work/quality, or a quick dir]")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="at most N rows per task")
    ap.add_argument("--out", default=None, help="report path [docs/results.md; quick: WORK/results.md]")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--general-task", default="general")
    ap.add_argument("--device", default="cpu", help="where evaluation runs (cpu, cuda)")
    args = ap.parse_args(argv)
    if not args.quick and not args.recipe:
        ap.error("pass a recipe, or --quick")
    work = Path(args.work or (REPO / "bench_work" / ("quality-quick" if args.quick else "quality"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        os.environ.setdefault("MOEMERGE_HOME", str(work / "home"))
    limit = args.limit if args.limit is not None else (6 if args.quick else None)
    out = Path(args.out) if args.out else (work / "results.md" if args.quick else REPO / "docs" / "results.md")
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = sorted(set(wanted) - set(ALL_SYSTEMS))
    if bad:
        ap.error(f"unknown systems {bad}")

    from mergekit_moe.cli._console import RichReporter, out_console, quiet_libraries
    from mergekit_moe.eval_data import load_eval_rows, reference_answers
    from mergekit_moe.eval_plots import comparison_plot
    from mergekit_moe.eval_target import load_target
    from mergekit_moe.evaluate import EvalConfig, evaluate, write_outputs
    from mergekit_moe.recipe import load_recipe
    from mergekit_moe.registry import Registry

    quiet_libraries()
    console = out_console  # a terminal's width; a log file gets the full table, not one cut to 80 columns
    recipe_path = quick_recipe(work) if args.quick else Path(args.recipe)
    recipe = load_recipe(recipe_path)
    registry = Registry()
    base = _base_ref(recipe)
    rows = load_eval_rows(recipe_path, args.split, general_task=args.general_task, limit=limit)
    reference = reference_answers(recipe_path, args.split, general_task=args.general_task)
    cfg = EvalConfig(batch_size=args.batch_size, general_task=args.general_task)
    systems: dict[str, dict] = {}

    def run(name: str, target: str | None, build_s: float) -> None:
        console.rule(f"[bold]{name}")
        with RichReporter() as rep:
            tgt = load_target(target, base=base if target is None else None, registry=registry, device=args.device,
                              reporter=rep)
            res = evaluate(tgt, rows, cfg, reporter=rep, data_label=f"{recipe_path} [{args.split}]", reference=reference)
            write_outputs(res, work / "eval" / name.replace(":", "-"))
        systems[name] = summarize(res, build_s)
        console.print(f"{name}: task avg {_f(systems[name]['average'])}, retention {_f(systems[name]['retention'])}")

    with RichReporter() as rep:
        experts = train_experts(recipe, registry, rep)
    if "base" in wanted or "oracle" in wanted:
        run("base", None, 0.0)
    if "experts" in wanted or "oracle" in wanted:
        for n, info in experts.items():
            run(f"expert:{n}", str(info["path"]), info["train_s"])
    if "multitask" in wanted:
        with RichReporter() as rep:
            path, secs = train_multitask(recipe, registry, work, rep)
        run("multitask", str(path), secs)
    for method in ("linear", "ties", "topk", "moe"):
        if method in wanted:
            with RichReporter() as rep:
                path, secs = build_composed(recipe, method, work, registry, experts, rep)
            run(method, str(path), secs)
    if "oracle" in wanted and experts:
        systems["oracle"] = oracle(systems, experts, args.general_task)

    plot = out.with_name(out.stem + "_scores.png")
    comparison_plot({n: s["tasks"] for n, s in systems.items()}, plot, title=f"{recipe_path.name} [{args.split}]")
    shown = [a if a != str(recipe_path) else os.path.relpath(recipe_path, REPO) for a in argv]
    text = write_report(systems, out, recipe_path=Path(os.path.relpath(recipe_path, REPO)) if not args.quick else recipe_path,
                        argv=shown, split=args.split, limit=limit, n_rows=len(rows), general_task=args.general_task, plot=plot)
    (work / "systems.json").write_text(json.dumps(systems, indent=2, default=str), encoding="utf-8")
    print_summary(console, systems, general_task=args.general_task, n_rows=len(rows), split=args.split)
    console.print(f"[bold]report[/]: {out} (table, settings, how to reproduce); plot: {plot}", highlight=False)
    moe = work / "ckpt" / "moe"
    if moe.exists():
        console.print(f"[bold]Med-MoE-LoRA checkpoint[/]: {moe}", highlight=False)
        console.print(f"  calibration plots: {moe / 'calibration'} (loss_curves.png, routing_heatmap.png)", highlight=False)
        console.print(f"  try: moemerge inspect {moe}    moemerge generate {moe} \"Symptoms: ...\" --show-routing",
                      highlight=False, markup=False)
    console.print(f"[bold]per-system outputs[/]: {work / 'eval'}/<system>/ (scores.json, predictions.jsonl, task_scores.png, "
                  "routing_heatmap.png)", highlight=False)
    return 0


def print_summary(console, systems: dict, *, general_task: str, n_rows: int, split: str) -> None:
    """The comparison as a terminal table (the markdown report is for the file)."""
    from mergekit_moe.cli._console import table

    tasks = sorted({t for s in systems.values() for t in s["tasks"] if t != general_task})
    metrics = next(iter(systems.values()))["metrics"]
    head = ["system", *[f"{t}\n({metrics.get(t)})" for t in tasks], "task avg", "retention", "KL(base||sys)", "params"]
    best = max((s["average"] for s in systems.values() if s["average"] is not None), default=None)
    rows = []
    for name, s in systems.items():
        avg = _f(s["average"])
        rows.append([name, *[_f(s["tasks"].get(t)) for t in tasks],
                     f"[bold green]{avg}[/]" if s["average"] is not None and s["average"] == best else avg,
                     _f(s["retention"]), _f(s["kl"], 4), f"{s['params']:,}"])
    console.print(table(f"results on the {split} split ({n_rows} rows)", head, rows))


if __name__ == "__main__":
    sys.exit(main())

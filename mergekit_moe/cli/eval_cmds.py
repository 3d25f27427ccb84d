"""CLI commands for eval: task metrics, knowledge retention, routing analysis."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ..errors import UsageError


def _parse_metrics(values: tuple[str, ...]) -> dict[str, str]:
    from ..metrics import METRICS

    out: dict[str, str] = {}
    for v in values:
        task, sep, metric = v.partition("=")
        if not sep or not task or metric not in METRICS:
            raise UsageError(f"--metric {v!r} is not TASK=METRIC", hint=f"METRIC is one of {', '.join(METRICS)}, e.g. --metric summary=rougeL")
        out[task] = metric
    return out


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _default_out(target: str | None, base: str | None) -> Path:
    name = Path(str(target or base)).name or "target"
    return Path("eval_results") / re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def print_result(result, paths: dict | None = None) -> None:
    """Rich tables: per-task scores, retention, routing; then where the files went."""
    from ._console import out_console, table

    res = result.to_json()
    rows = [(t, v["n"], v["metric"] or "-", _fmt(v["score"]), _fmt(v["rougeL"]), _fmt(v["exact_match"]), _fmt(v["loss"]))
            for t, v in res["tasks"].items()]
    rows.append(("average (tasks)", "", "", _fmt(res["average"]), "", "", ""))
    tgt = res["target"]
    out_console.print(table(f"eval: {tgt['name']} ({tgt['kind']}, base {tgt['base_model']})",
                            ["task", "n", "metric", "score", "ROUGE-L", "exact match", "loss/token"], rows))
    ret = res["retention"]
    if ret:
        out_console.print(table("general-knowledge retention", ["probes", "base correct", "target correct", "kept",
                                                                "retention", "KL(base||target)", "ppl ratio"],
                                [(ret["n_probes"], ret["base_correct"], ret["target_correct"], ret["kept"],
                                  _fmt(ret["share"]), _fmt(ret["kl"], 4), _fmt(ret["ppl_ratio"]))]))
    rt = res["routing"]
    if rt:
        names = rt["experts"]
        rrows = []
        for task, per_layer in rt["mean_weight"].items():
            means = [sum(layer[k] for layer in per_layer) / len(per_layer) for k in range(len(names))]
            rrows.append((task, *[_fmt(m, 2) for m in means], _fmt(rt["per_task_accuracy"].get(task))))
        out_console.print(table(f"routing: mean weight over layers (routing accuracy {_fmt(rt['accuracy'])})",
                                ["task", *names, "accuracy"], rrows))
    if paths:
        out_console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)


def register(group: click.Group) -> None:
    """Add this module's commands to the ``moemerge`` group."""

    @group.command("eval")
    @click.argument("target", required=False)
    @click.option("--data", "data", required=True, metavar="FILE|DIR|RECIPE",
                  help="Evaluation rows (prompt/response, messages or text; with task and optional id), a data directory, or a recipe.")
    @click.option("--split", default=None, help="Split to read from data directories and recipes [default: test].")
    @click.option("--base", default=None, metavar="MODEL", help="Base model; alone (no TARGET) evaluates the bare base. Must match the target's base.")
    @click.option("--probe", default=None, metavar="FILE", help="General-knowledge probe rows (added as task 'general').")
    @click.option("--metric", "metric", multiple=True, metavar="TASK=METRIC",
                  help="Override a task's metric: accuracy, rougeL or exact_match (repeatable).")
    @click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Output directory [default: eval_results/NAME].")
    @click.option("--limit", type=click.IntRange(1), default=None, help="At most N rows per task.")
    @click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Generation batch size.")
    @click.option("--max-new-tokens", type=click.IntRange(1), default=None, help="[default: longest gold answer + 8, per task]")
    @click.option("--max-length", type=click.IntRange(8), default=512, show_default=True, help="Max prompt + answer tokens.")
    @click.option("--general-task", default="general", show_default=True, help="Task name of the retention probes.")
    @click.option("--no-retention", is_flag=True, help="Skip base-vs-target retention and KL/perplexity shift.")
    @click.option("--device", default="cpu", show_default=True, help="Where the model runs: cpu, cuda, cuda:1, mps.")
    def eval_cmd(target, data, split, base, probe, metric, out_dir, limit, batch_size, max_new_tokens, max_length,
                 general_task, no_retention, device):
        """Evaluate TARGET (composed checkpoint, expert bundle or registry name, PEFT adapter) or the bare --base.

        Per task: accuracy on a fixed label set (detected from the gold answers) or ROUGE-L, plus
        loss per answer token; greedy decoding with the tokenizer's chat template. Retention: of the
        general probes the base answers correctly, the share the target still answers, and
        KL(base||target) / perplexity ratio on general rows. Composed checkpoints also get routing
        weights per task and layer and routing accuracy. Writes scores.json, predictions.jsonl and PNGs.
        """
        from ..eval_data import load_eval_rows, reference_answers
        from ..eval_target import load_target
        from ..evaluate import EvalConfig, evaluate, write_outputs
        from ._console import RichReporter

        if target is None and base is None:
            raise UsageError("nothing to evaluate", hint="pass a TARGET or --base MODEL")
        cfg = EvalConfig(metric_overrides=_parse_metrics(metric), max_new_tokens=max_new_tokens, batch_size=batch_size,
                         max_length=max_length, general_task=general_task, retention=not no_retention)
        # rows first: a missing split fails before any model is loaded
        rows = load_eval_rows(data, split, probe=probe, general_task=general_task, limit=limit)
        with RichReporter() as rep:
            tgt = load_target(target, base=base, device=device, reporter=rep)
            result = evaluate(tgt, rows, cfg, reporter=rep, data_label=f"{data}" + (f" [{split}]" if split else ""),
                              reference=reference_answers(data, split, general_task=general_task))
            paths = write_outputs(result, out_dir or _default_out(target, base))
        print_result(result, paths)

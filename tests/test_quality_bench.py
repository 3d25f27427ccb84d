"""benchmarks/quality.py bookkeeping: oracle routing arithmetic and the markdown report (no models).

The last test runs the whole pipeline as `make demo-quick` does (``benchmarks/quality.py --quick``, ~10 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _system(scores: dict, params: int, retention=None, kl=None) -> dict:
    tasks = [v for t, v in scores.items() if t != "general"]
    return {"tasks": scores, "metrics": {"dx": "accuracy", "sum": "rougeL", "general": "rougeL"},
            "average": sum(tasks) / len(tasks), "retention": retention, "kl": kl, "ppl_ratio": 1.1, "params": params,
            "build_s": 2.0, "eval_s": 3.0, "routing_accuracy": None}


def test_oracle_takes_each_task_from_its_own_expert(bench):
    systems = {
        "base": _system({"dx": 0.1, "sum": 0.2, "general": 0.5}, 0, 1.0, 0.0),
        "expert:dx": _system({"dx": 0.9, "sum": 0.1, "general": 0.3}, 100, 0.6, 0.2),
        "expert:sum": _system({"dx": 0.2, "sum": 0.7, "general": 0.2}, 50, 0.4, 0.3),
        "expert:gen": _system({"dx": 0.0, "sum": 0.0, "general": 0.8}, 30, 0.9, 0.05),
    }
    experts = {"dx": {"task": "dx", "train_s": 10.0}, "sum": {"task": "sum", "train_s": 5.0},
               "gen": {"task": "general", "train_s": 1.0, "knowledge": True}}
    o = bench.oracle(systems, experts, "general")
    assert o["tasks"] == {"dx": 0.9, "sum": 0.7, "general": 0.8}
    assert o["average"] == pytest.approx(0.8)
    assert (o["retention"], o["kl"], o["params"], o["build_s"]) == (0.9, 0.05, 180, 16.0)
    # without a knowledge expert, general rows go to the base
    del experts["gen"], systems["expert:gen"]
    o = bench.oracle(systems, experts, "general")
    assert o["tasks"]["general"] == 0.5 and o["retention"] == 1.0


def test_report_has_table_ranking_and_command(bench, tmp_path):
    systems = {"base": _system({"dx": 0.1, "sum": 0.2, "general": 0.5}, 0, 1.0, 0.0),
               "moe": _system({"dx": 0.8, "sum": 0.6, "general": 0.45}, 1234, 0.9, 0.01)}
    out = tmp_path / "results.md"
    text = bench.write_report(systems, out, recipe_path=Path("recipes/demo.yaml"), argv=["recipes/demo.yaml"], split="test",
                              limit=None, n_rows=10, general_task="general", plot=tmp_path / "results_scores.png")
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| system | dx (accuracy) | sum (rougeL) | task avg | general (rougeL)")
    assert rows[2].startswith("| moe | 0.800 | 0.600 | 0.700 | 0.450 | 0.900 |") and "1,234" in rows[2]
    assert "Ranking by task average: moe (0.700), base (0.150)" in text
    assert "python benchmarks/quality.py recipes/demo.yaml" in text and "![scores by system](results_scores.png)" in text


def test_quick_demo_pipeline_end_to_end(tmp_path):
    """`make demo-quick`'s command: trains, composes, evaluates on a tiny random model and tells where everything is."""
    import os
    import subprocess
    import sys

    work = tmp_path / "work"
    env = dict(os.environ, MOEMERGE_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--systems", "base,multitask,moe", "--work", str(work)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # the comparison as a table with every system, then where the outputs are
    for name in ("base", "multitask", "moe"):
        assert f"│ {name} " in p.stdout, p.stdout
    assert "task avg" in p.stdout and "retention" in p.stdout
    moe = work / "ckpt" / "moe"
    assert f"Med-MoE-LoRA checkpoint: {moe}" in p.stdout and str(work / "results.md") in p.stdout
    assert (moe / "moe_config.json").is_file() and (moe / "calibration" / "routing_heatmap.png").is_file()
    for name in ("base", "multitask", "moe"):
        assert (work / "eval" / name / "scores.json").is_file() and (work / "eval" / name / "task_scores.png").is_file()
    report = (work / "results.md").read_text()
    assert report.count("\n| ") == 4 and (work / "results_scores.png").stat().st_size > 1000

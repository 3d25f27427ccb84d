"""compose / validate end to end: data-free defaults, bad recipes fail early and write nothing, baselines,
allocation schedules, base fingerprints, interruption safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_peft_adapter, run_cli
from mergekit_moe.atomic import leftover_staging
from mergekit_moe.compose import compose, plan_compose
from mergekit_moe.errors import BaseMismatchError, RecipeError, ValidationError
from mergekit_moe.progress import NullReporter
from mergekit_moe.recipe import load_recipe, parse_recipe

ALL = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def work(tmp_path, tiny_base):
    """A folder with a base link and three small random experts (ranks 4, 4, 8)."""
    (tmp_path / "base").symlink_to(tiny_base)
    for i, (n, r) in enumerate((("a", 4), ("b", 4), ("wide", 8))):
        make_peft_adapter(tiny_base, tmp_path / f"exp-{n}", r=r, seed=i, scale=0.05, targets=ALL)
    return tmp_path


def write(work: Path, text: str, name: str = "recipe.yaml") -> Path:
    f = work / name
    f.write_text(text)
    return f


MINIMAL = """base_model: ./base
experts:
  - {name: a, source: ./exp-a}
  - {name: b, source: ./exp-b}
output: {path: ./out}
"""


def test_minimal_recipe_runs_data_free_via_cli_and_says_which_defaults(work, tiny_base):
    f = write(work, MINIMAL)
    proc = run_cli("compose", f)
    assert proc.returncode == 0, proc.stderr
    assert "routing.init = arrow" in proc.stderr and "calibration = none" in proc.stderr
    out = work / "out"
    assert {"moe_config.json", "moe_lora.safetensors", "recipe.yaml", "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "recipe.yaml").read_text() == MINIMAL  # the recipe as given
    from mergekit_moe.checkpoint import load_moe_model

    model, tok, spec = load_moe_model(out)
    assert [s.name for s in spec.layers[0].slots] == ["a", "b", "null"]
    assert spec.metrics["router_init"] == "arrow"
    with torch.no_grad():
        logits = model(**tok("Symptoms: fever", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_validate_cli_checks_without_writing(work):
    f = write(work, MINIMAL)
    ok = run_cli("validate", f)
    assert ok.returncode == 0 and "recipe OK" in ok.stdout
    bad = write(work, MINIMAL.replace("source: ./exp-b", "sorce: ./exp-b"), "bad.yaml")
    proc = run_cli("validate", bad)
    assert proc.returncode == 1
    err = " ".join(proc.stderr.split())
    assert "experts[1].sorce" in err and "did you mean 'source'" in err
    assert not (work / "out").exists()


@pytest.mark.parametrize("edit,where", [
    (lambda t: t.replace("output:", "outptu:"), "outptu"),                              # typo in a key
    (lambda t: t.replace("./exp-b", "no-such-expert@3"), "experts[1].source (b)"),     # missing expert
    (lambda t: t.replace("./exp-b", "./exp-missing"), "experts[1]"),                    # missing directory
    (lambda t: t.replace("./exp-b", "./exp-wide") + "allocation: {schedule: [1, all]}\n", "allocation.rank"),  # rank mismatch
])
def test_bad_recipes_fail_before_heavy_work_and_write_nothing(work, edit, where):
    f = write(work, edit(MINIMAL))
    with pytest.raises((RecipeError, ValidationError, Exception)) as ei:
        compose(f)
    msg = str(ei.value)
    assert where in msg and "\n" not in msg, msg
    assert not (work / "out").exists() and not leftover_staging(work)


def test_wrong_base_for_an_expert_is_caught_by_shapes(work, tiny_base_factory):
    other = tiny_base_factory("llama", hidden=32)
    make_peft_adapter(other, work / "exp-other", seed=3, targets=ALL)
    f = write(work, MINIMAL.replace("./exp-b", "./exp-other"))
    with pytest.raises(ValidationError) as ei:
        plan_compose(load_recipe(f))
    assert "experts[1] (b)" in str(ei.value) and "lora_A" in str(ei.value)


def test_base_fingerprint_mismatch_blocks_unless_allowed(work, tiny_base, tiny_base_factory):
    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.registry import Registry

    # same shapes for q_proj (hidden 64) but another architecture config: another fingerprint
    other = tiny_base_factory("llama", kv_heads=4)
    make_peft_adapter(other, work / "exp-kv4", seed=4, targets=["q_proj"])
    Registry().import_adapter(work / "exp-kv4", name="kvx", task="kvx", base=str(other))
    f = write(work, MINIMAL.replace("./exp-b", "kvx"))
    with pytest.raises(BaseMismatchError) as ei:
        compose(f)
    msg = str(ei.value)
    assert fingerprint_of(other)[:16] in msg and fingerprint_of(tiny_base)[:16] in msg and "--allow-base-mismatch" in msg
    assert not (work / "out").exists()
    rep = NullReporter()
    res = compose(f, allow_base_mismatch=True, reporter=rep)
    assert res.output.is_dir() and any("expert 'b'" in w and "allowed" in w for w in rep.warnings)


def test_schedule_one_then_all_merges_shallow_keeps_deep_separate(work):
    f = write(work, MINIMAL.replace("output:", "allocation: {schedule: [1, all], merge_method: concat}\noutput:"))
    res = compose(f)
    assert res.allocation == [(0, 1, "a+b"), (1, 1, "a+b"), (2, 2, "a | b"), (3, 2, "a | b")]
    from mergekit_moe.checkpoint import load_checkpoint
    from mergekit_moe.lora import read_adapter

    spec = load_checkpoint(work / "out")
    assert [s.name for s in spec.layers[0].slots] == ["a+b", "null"] and spec.layers[0].slots[0].method == "concat"
    assert [s.name for s in spec.layers[3].slots] == ["a", "b", "null"]
    a, b = read_adapter(work / "exp-a"), read_adapter(work / "exp-b")
    m = "model.layers.0.self_attn.q_proj"
    ml = spec.modules[m]
    cols = ml.slot_of_rank == 0
    torch.testing.assert_close(ml.B[:, cols] @ ml.A[cols], (a.factors[m].delta() + b.factors[m].delta()) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "topk", "uniform"])
def test_baselines_from_the_same_recipe(work, method):
    res = compose(write(work, MINIMAL), method=method)
    from mergekit_moe.checkpoint import load_checkpoint

    spec = load_checkpoint(res.output)
    assert spec.metrics["method"] == method
    if method in ("linear", "ties", "dare_ties"):
        assert all(lay.n_slots == 1 and lay.slots[0].members == ["a", "b"] for lay in spec.layers.values())
        assert spec.knowledge_expert is None
        # notes about slots, routers and the knowledge path would mislead for one merged LoRA
        assert not any(n.startswith(("allocation", "routing", "knowledge_expert")) for n in res.notes), res.notes
    else:
        assert all(lay.n_slots == 3 for lay in spec.layers.values())
        assert any(n.startswith("routing.init") for n in res.notes), res.notes
    if method == "topk":
        assert spec.routing.top_k == 1
    if method == "uniform":
        assert all(torch.all(lay.router_weight == 0) for lay in spec.layers.values())


def test_hf_sources_go_through_the_resolver_hook(work, monkeypatch):
    import mergekit_moe.compose_plan as comp

    seen = []

    def fake(ref, text, registry, reporter, **kw):
        assert "lock" in kw  # the recipe's lock file is handed to the Hub resolver
        seen.append((ref.name, ref.version, ref.subfolder))
        return work / "exp-b"

    monkeypatch.setattr(comp, "hub_resolver", fake)
    res = compose(write(work, MINIMAL.replace("./exp-b", "hf://org/experts@v1:b")))
    assert seen == [("org/experts", "v1", "b")] and res.output.is_dir()


@pytest.mark.parametrize("stage", ["load experts", "allocate + merge", "router init", "write-inside"])
def test_interrupted_compose_leaves_no_output(work, stage, monkeypatch):
    class Boom(NullReporter):
        def start(self, task, total=None):
            if task == stage:
                raise KeyboardInterrupt

    if stage == "write-inside":  # interrupt inside the staging directory, after the checkpoint files exist
        import mergekit_moe.atomic as atomic

        real = atomic.atomic_write_json

        def boom(path, obj):
            if Path(path).name == "compose_report.json":
                raise KeyboardInterrupt
            return real(path, obj)

        monkeypatch.setattr(atomic, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        compose(write(work, MINIMAL), reporter=Boom())
    assert not (work / "out").exists()
    assert not leftover_staging(work)


def test_killed_cli_compose_leaves_no_output_or_a_complete_one(work):
    """SIGTERM at several moments: afterwards the output is absent or loads and verifies."""
    from mergekit_moe.checkpoint import load_checkpoint

    f = write(work, MINIMAL)
    for delay in (1.5, 5.0):
        out = work / "out"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        proc = subprocess.Popen([sys.executable, "-m", "mergekit_moe", "compose", str(f)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ))
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        if out.exists():
            load_checkpoint(out)  # complete: hashes verify
        assert not leftover_staging(work)


def test_inline_train_block_trains_then_composes(work, tiny_base):
    import json

    rows = [{"prompt": f"Symptoms: case {i}. Diagnosis?", "response": "flu"} for i in range(16)]
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = MINIMAL.replace("{name: b, source: ./exp-b}",
                           "{name: b, train: {data: d.jsonl, max_steps: 2, rank: 4, batch_size: 4, max_length: 32, "
                           "eval_every: 0, save_every: 0, target_modules: [q_proj, v_proj]}}")
    res = compose(write(work, text))
    from mergekit_moe.checkpoint import load_checkpoint
    from mergekit_moe.registry import Registry

    spec = load_checkpoint(res.output)
    assert "b" in spec.experts and Registry().find(name="b")
    assert parse_recipe(text).experts[1].train["max_steps"] == 2


def test_lora_knowledge_expert_gets_its_own_protected_slot(work):
    make_peft_adapter(work / "base", work / "exp-general", r=4, seed=9, scale=0.05, targets=ALL)
    text = MINIMAL.replace("output:", "knowledge_expert: {name: general, source: ./exp-general}\n"
                                      "allocation: {schedule: [1], merge_method: ties}\noutput:")
    res = compose(write(work, text))
    from mergekit_moe.checkpoint import load_checkpoint

    spec = load_checkpoint(res.output)
    assert spec.knowledge_expert == "general" and spec.experts["general"].role == "knowledge"
    for lay in spec.layers.values():  # every layer: the merged task cluster, then the untouched knowledge slot
        assert [s.members for s in lay.slots] == [["a", "b"], ["general"]]
        assert lay.slots[0].method == "ties" and lay.slots[1].method == "single"


def test_output_files_have_normal_permissions(work):
    res = compose(write(work, MINIMAL))
    umask = os.umask(0)
    os.umask(umask)
    for f in res.output.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_bfloat16_output_loads_and_runs(work):
    res = compose(write(work, MINIMAL.replace("output: {path: ./out}", "output: {path: ./out, dtype: bfloat16}")))
    from mergekit_moe.checkpoint import load_moe_model

    model, tok, spec = load_moe_model(res.output)
    m = next(iter(spec.modules.values()))
    assert m.A.dtype == torch.bfloat16 and m.B.dtype == torch.bfloat16
    assert all(lay.router_weight.dtype == torch.float32 for lay in spec.layers.values())
    with torch.no_grad():
        assert torch.isfinite(model(**tok("Drug pair: a + b", return_tensors="pt")).logits).all()

"""Recipe parsing and validation: strict YAML, every problem at once with key paths, defaults, round trip."""

from __future__ import annotations

import pytest

from mergekit_moe.errors import RecipeError
from mergekit_moe.recipe import SourceRef, dump_recipe, load_recipe, parse_recipe, parse_source

MINIMAL = """
base_model: ./base
experts:
  - {name: diag, source: diag@1}
  - {name: summ, source: ./experts/summ}
output: {path: ./out}
"""


def problems(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as ei:
        parse_recipe(text)
    return dict(ei.value.problems)


def test_minimal_recipe_gets_data_free_defaults_and_says_so():
    r = parse_recipe(MINIMAL)
    assert r.expert_names == ["diag", "summ"]
    assert r.routing.init == "arrow" and r.calibration is None
    assert r.knowledge and r.knowledge_expert is None  # null knowledge expert = the base itself
    assert r.allocation.schedule == ["all"]
    said = " ".join(r.defaults_used)
    assert "routing.init = arrow" in said and "calibration = none" in said and "knowledge_expert = null" in said


def test_hidden_init_is_the_default_when_every_expert_has_prompts():
    r = parse_recipe(MINIMAL.replace("source: diag@1}", "source: diag@1, prompts: [a]}")
                     .replace("source: ./experts/summ}", "source: ./experts/summ, prompts: [b]}"))
    assert r.routing.init == "hidden"


def test_every_problem_reported_at_once_with_key_paths_and_suggestions():
    bad = """
base_model: ./base
experst: []
experts:
  - {name: a, sorce: a@1}
  - {name: a, source: "hf://org/repo@main:sub"}
allocation: {schedule: [1, 7], merge_method: tie}
routing: {granularity: tokens, temperature: 0}
calibration: {steps: 0, loss_weights: {kl: -1}}
output: {path: ./o, dtype: fp8}
"""
    p = problems(bad)
    assert "did you mean 'experts'" in p["experst"]
    assert "did you mean 'source'" in p["experts[0].sorce"]
    assert "duplicate expert name" in p["experts[1].name"]
    assert "out of range" in p["allocation.schedule[1]"]
    assert "did you mean 'ties'" in p["allocation.merge_method"]
    assert "did you mean 'token'" in p["routing.granularity"]
    assert "routing.temperature" in p and "calibration.steps" in p and "calibration.loss_weights.kl" in p
    assert "output.dtype" in p
    assert len(p) >= 10


def test_error_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(MINIMAL.replace("base_model", "base_modle"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(f)
    msg = str(ei.value)
    assert "\n" not in msg and str(f) in msg and "base_modle" in msg and "base_model" in msg


@pytest.mark.parametrize("text,where", [
    ("a: 1\na: 2\n", "a"),
    ("base_model: &b x\nexperts: *b\n", "line 2"),
    ("base_model: !!python/object/apply:os.system ['echo hi']\n", "base_model"),
    ("base_model: !custom x\n", "base_model"),
    ("base_model: [unclosed\n", "line"),
    ("- just\n- a list\n", "<root>"),
])
def test_unsafe_or_malformed_yaml_is_refused(text, where):
    p = problems(text)
    assert any(k.startswith(where) for k in p), p


def test_inline_train_block_checked_against_trainconfig_fields():
    text = MINIMAL.replace("{name: diag, source: diag@1}", "{name: diag, train: {data: d.jsonl, rnak: 4, lr: fast}}")
    p = problems(text)
    assert "did you mean 'rank'" in p["experts[0].train.rnak"]
    assert "experts[0].train.lr" in p
    ok = parse_recipe(MINIMAL.replace("{name: diag, source: diag@1}", "{name: diag, train: {data: d.jsonl, rank: 4, lr: 1e-3}}"))
    assert ok.experts[0].train == {"data": "d.jsonl", "rank": 4, "lr": 1e-3}  # YAML 1.1 text "1e-3" becomes a number
    assert ok.experts[0].calibration_data == "d.jsonl"


def test_calibration_needs_data_per_expert():
    p = problems(MINIMAL + "calibration: {steps: 5}\n")
    assert "experts[0].data" in p and "experts[1].data" in p


def test_schedule_and_profile_are_exclusive_and_min_le_max():
    p = problems(MINIMAL + "allocation: {schedule: [1, all], profile: increasing}\n")
    assert "allocation.profile" in p
    p = problems(MINIMAL + "allocation: {profile: increasing, min: 2, max: 1}\n")
    assert "allocation.min" in p


@pytest.mark.parametrize("src,ref", [
    ("diag", SourceRef("registry", "diag")),
    ("diag@1.2", SourceRef("registry", "diag", "1.2")),
    ("sha256:" + "a" * 64, SourceRef("registry", "sha256:" + "a" * 64)),
    ("./experts/x", SourceRef("local", "./experts/x")),
    ("/abs/x", SourceRef("local", "/abs/x")),
    ("hf://org/repo", SourceRef("hf", "org/repo")),
    ("hf://org/repo@v1.0:experts/diag", SourceRef("hf", "org/repo", "v1.0", "experts/diag")),
])
def test_source_syntax(src, ref):
    assert parse_source(src) == ref


@pytest.mark.parametrize("src", ["hf://org", "hf://org/repo:../../x", "s3://bucket/x", "bad name", "x@"])
def test_bad_sources_name_the_key(src):
    p = problems(MINIMAL.replace("diag@1", f'"{src}"'))
    assert "experts[0].source" in p


def test_round_trip_of_a_full_recipe():
    full = """
base_model: ./base
method: moe
experts:
  - {name: diag, source: diag@1, prompts: ["What is the diagnosis?"], negative_prompts: [Hello], data: d.jsonl}
  - {name: ddi, source: hf://org/ddi@abc:ddi, data: ddi.jsonl}
knowledge_expert: {name: general, source: ./general}
allocation: {profile: increasing, min: 1, max: all, merge_method: ties, rank: 8, density: 0.3}
routing: {granularity: sequence, temperature: 0.5, top_k: 2, init: hidden, hidden_pool: last}
calibration: {general_data: g.jsonl, steps: 20, lr: 0.01, loss_weights: {kl: 2.0}}
output: {path: ./out, dtype: bfloat16, model_card: {license: apache-2.0, tags: [medical]}}
"""
    r = parse_recipe(full)
    again = parse_recipe(dump_recipe(r))
    assert again == r
    assert again.calibration.loss_weights["kl"] == 2.0 and again.calibration.loss_weights["lm"] == 1.0
    assert r.knowledge_expert.name == "general"


def test_knowledge_expert_false_disables_the_knowledge_path():
    r = parse_recipe(MINIMAL + "knowledge_expert: false\n")
    assert not r.knowledge and r.knowledge_expert is None
    assert parse_recipe(dump_recipe(r)) == r


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    f = tmp_path / "sub" / "r.yaml"
    f.parent.mkdir()
    f.write_text(MINIMAL)
    r = load_recipe(f)
    assert r.resolve_path(r.output.path) == (tmp_path / "sub" / "out").resolve()


def test_shipped_recipes_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        r = load_recipe(f)
        assert parse_recipe(dump_recipe(r)) == r

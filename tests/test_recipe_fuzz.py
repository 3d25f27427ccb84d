"""Property tests for recipe parsing: never crashes, round-trips, refuses unsafe YAML."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_moe.errors import RecipeError
from mergekit_moe.recipe import (ALLOCATION_KEYS, CALIBRATION_KEYS, EXPERT_KEYS, OUTPUT_KEYS, ROUTING_KEYS, TOP_KEYS, dump_recipe,
                                 parse_recipe)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = sorted(TOP_KEYS | EXPERT_KEYS | ALLOCATION_KEYS | ROUTING_KEYS | CALIBRATION_KEYS | OUTPUT_KEYS) + ["experst", "sorce", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["all", "token", "hidden", "ties", "a@1", "./x", "hf://o/r", "", "1e-3"]), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)


def assert_parses_or_reports(text: str) -> None:
    try:
        parse_recipe(text)
    except RecipeError as exc:
        assert exc.problems, "a RecipeError always lists its problems"
        for path, msg in exc.problems:
            assert isinstance(path, str) and path, "every problem has a key path or location"
            assert isinstance(msg, str) and msg
        assert "\n" not in str(exc)


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_any_mapping_parses_or_raises_recipe_error(data):
    assert_parses_or_reports(yaml.safe_dump(data))


@FAST
@given(st.text(max_size=200))
def test_any_text_parses_or_raises_recipe_error(text):
    assert_parses_or_reports(text)


names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
valid = st.fixed_dictionaries({
    "base_model": st.sampled_from(["./base", "org/model", "/abs/base"]),
    "experts": st.lists(st.fixed_dictionaries(
        {"source": st.sampled_from(["x@1", "./e", "hf://o/r@main:sub", "sha256:" + "0" * 64])},
        optional={"prompts": st.lists(st.text(min_size=1, max_size=10), max_size=2), "data": st.just("d.jsonl")}),
        min_size=1, max_size=4),
    "output": st.fixed_dictionaries({"path": st.just("./out")}, optional={"dtype": st.sampled_from(["float32", "bfloat16"])}),
}, optional={
    "routing": st.fixed_dictionaries({}, optional={"granularity": st.sampled_from(["token", "sequence"]),
                                                   "temperature": st.floats(0.01, 10), "top_k": st.sampled_from([None, 1])}),
    "allocation": st.one_of(st.fixed_dictionaries({"schedule": st.lists(st.sampled_from([1, "all"]), min_size=1, max_size=4)},
                                                  optional={"merge_method": st.sampled_from(["linear", "ties", "dare_ties", "concat"])}),
                            st.fixed_dictionaries({"profile": st.just("increasing")})),
    "knowledge_expert": st.sampled_from([None, False, {"name": "general", "source": "./g"}]),
})


@FAST
@given(valid, st.data())
def test_round_trip_of_valid_recipes(rec, data):
    for i, e in enumerate(rec["experts"]):
        e["name"] = f"e{i}-" + data.draw(names)
    if rec.get("calibration"):
        rec.pop("calibration")
    r = parse_recipe(yaml.safe_dump(rec))
    text = dump_recipe(r)
    assert parse_recipe(text) == r
    assert dump_recipe(parse_recipe(text)) == text


@pytest.mark.parametrize("text", [
    "base_model: !!python/object/apply:os.system ['true']\n",
    "base_model: !!python/name:os.system\n",
    "experts: !!binary aGVsbG8=\n",
    # billion laughs: refused at the first alias, never expanded
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
    "base_model: x\nbase_model: y\n",
    "base: &x {a: 1}\nother:\n  <<: *x\n",
    "[" * 3000,
])
def test_unsafe_documents_are_refused(text):
    with pytest.raises(RecipeError) as ei:
        parse_recipe(text)
    assert ei.value.problems[0][0]

"""Recipe FILES from elsewhere (issue 9, item 5), complementing tests/test_recipe_fuzz.py (which fuzzes text).

Any bytes on disk (invalid UTF-8, NUL, a BOM, huge or deeply nested documents, several documents,
non-string keys, a directory instead of a file) either load or raise ``RecipeError`` whose every
problem has a location, in one line, naming the file.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_moe.errors import RecipeError
from mergekit_moe.recipe import load_recipe

VALID = b"base_model: ./base\nexperts:\n  - {name: a, source: ./a}\noutput: {path: ./out}\n"


def _assert_loads_or_reports(path) -> None:
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p and isinstance(m, str) and m for p, m in exc.problems)
        assert "\n" not in str(exc) and str(path) in str(exc)


@pytest.mark.parametrize("data,where", [
    (b"base_model: \xff\xfe\n", "<yaml>"),
    (b"base_model: x\x00\n", "<yaml>"),
    (b"a: " + b"x" * 2_000_000 + b"\n", "<yaml>"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "<yaml>"),
    (b"a:\n" + b"".join(b" " * (i + 1) + b"b:\n" for i in range(300)), "a.b.b"),
    (b"base_model:\t\tx\n\t- y", "line 1"),
    (b"a: 1\n---\nb: 2\n", "line 2"),
    (b"? [a, b]\n: 1\n", "line 1"),
    (b"1: 2\n", "1"),
])
def test_hostile_recipe_files_give_located_recipe_errors(tmp_path, data, where):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(data)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert any(path.startswith(where) for path, _msg in ei.value.problems), ei.value.problems
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


def test_a_utf8_bom_is_accepted_and_a_directory_is_refused(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + VALID)
    assert load_recipe(p).experts[0].name == "a"
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prefix=st.integers(0, len(VALID)), junk=st.binary(max_size=40), cut=st.booleans())
def test_mutated_recipe_bytes_load_or_report(tmp_path, prefix, junk, cut):
    """A valid file with arbitrary bytes spliced in (or cut off) at any point."""
    data = VALID[:prefix] + junk + (b"" if cut else VALID[prefix:])
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(data)
    _assert_loads_or_reports(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_load_or_report(tmp_path, data):
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(data)
    _assert_loads_or_reports(p)

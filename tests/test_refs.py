"""Hub references: ``org/repo[@rev][:subfolder]`` and ``hf://`` spellings, and refusal of escaping paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergekit_moe.errors import UnsafeFileError, UsageError
from mergekit_moe.refs import HubRef, check_subfolder, is_hub_ref, parse_ref


@pytest.mark.parametrize("text, repo, rev, sub", [
    ("medorg/dx", "medorg/dx", None, ""),
    ("medorg/dx@v2", "medorg/dx", "v2", ""),
    ("medorg/dx@main:experts/dx", "medorg/dx", "main", "experts/dx"),
    ("medorg/dx:experts/dx/", "medorg/dx", None, "experts/dx"),
    ("hf://medorg/dx", "medorg/dx", None, ""),
    ("hf://medorg/dx@refs/pr/1:sub", "medorg/dx", "refs/pr/1", "sub"),
    ("hf://medorg/dx/experts/dx", "medorg/dx", None, "experts/dx"),
    ("hf://models/medorg/dx@" + "a" * 40, "medorg/dx", "a" * 40, ""),
])
def test_parse_both_spellings(text, repo, rev, sub):
    ref = parse_ref(text)
    assert (ref.repo_id, ref.revision, ref.subfolder) == (repo, rev, sub)
    assert parse_ref(ref.url()) == ref and parse_ref(ref.cli()) == ref
    assert ref.rev == (rev or "main")


def test_pinned_only_for_full_commit_sha():
    assert parse_ref("a/b@" + "0123456789abcdef" * 2 + "01234567").pinned
    assert not parse_ref("a/b@main").pinned and not parse_ref("a/b@0123abc").pinned


@pytest.mark.parametrize("bad", ["medorg", "a/b/c", "org/re po", "org/repo@", "hf://datasets/a/b", "", "hf://a",
                                 "org/..", "org/repo@bad..rev"])
def test_bad_references(bad):
    with pytest.raises(UsageError):
        parse_ref(bad)


@pytest.mark.parametrize("sub", ["../x", "a/../../b", "/etc", "a//b", "./a", "a\\b", "C:/x", "a/\x00"])
def test_escaping_subfolders_refused(sub):
    with pytest.raises(UnsafeFileError):
        check_subfolder(sub)
    with pytest.raises((UnsafeFileError, UsageError)):
        parse_ref(f"org/repo:{sub}")


def test_is_hub_ref():
    assert is_hub_ref("hf://a/b") and not is_hub_ref("a/b") and not is_hub_ref("dx@1")


_part = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,12}", fullmatch=True)


@given(_part, _part, st.one_of(st.none(), _part), st.lists(_part, max_size=3))
def test_roundtrip_property(ns, name, rev, sub):
    ref = HubRef(f"{ns}/{name}", rev, "/".join(sub))
    assert parse_ref(ref.url()) == ref
    assert parse_ref(ref.cli()) == ref

"""atomic writes, hashing, base resolution and fingerprints."""

import json

import pytest

from mergekit_moe import atomic, base
from mergekit_moe.errors import ModelLoadError


def test_staging_dir_commits_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic.staging_dir(target) as stage:
        (stage / "a.txt").write_text("hi")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "hi"
    assert atomic.leftover_staging(tmp_path) == []


def test_staging_dir_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(target) as stage:
            (stage / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert not target.exists()
    assert atomic.leftover_staging(tmp_path) == []


def test_staging_dir_overwrite_keeps_old_until_done(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(target, overwrite=True):
            raise RuntimeError("crash")
    assert (target / "old.txt").read_text() == "old"
    with atomic.staging_dir(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_atomic_write_json(tmp_path):
    atomic.atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": 1}


def test_fingerprint_stable_and_sensitive(tiny_base, tiny_base_factory):
    fp1 = base.fingerprint_of(tiny_base)
    assert fp1 == base.fingerprint_of(str(tiny_base)) and len(fp1) == 64
    other = tiny_base_factory("llama", layers=2)
    assert base.fingerprint_of(other) != fp1


def test_missing_base_is_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        base.load_config(tmp_path / "nothing-here")
    assert "\n" not in str(ei.value)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        base.load_config("someorg/not-cached-model")


def test_layer_ranges_collapses_only_consecutive_equal_rows():
    from mergekit_moe.cli._console import layer_ranges

    rows = [(0, 1, "a"), (1, 1, "a"), (2, 2, "a|b"), (3, 2, "a|b"), (4, 1, "a"), (6, 1, "a"), (7, 2, "a")]
    assert layer_ranges(rows) == [["0-1", 1, "a"], ["2-3", 2, "a|b"], ["4", 1, "a"], ["6", 1, "a"], ["7", 2, "a"]]
    assert layer_ranges([]) == []


def test_progress_in_a_log_file_prints_a_line_every_tenth():
    """A pipe or log cannot redraw bars: plain lines at 10%, 20%, ... and the final bar at the end."""
    import io

    from rich.console import Console

    from mergekit_moe.cli._console import RichReporter

    buf = io.StringIO()
    with RichReporter(Console(file=buf, force_terminal=False, width=120)) as rep:
        rep.start("train x", total=50)
        for i in range(50):
            rep.advance("train x", 1, loss=1.0 / (i + 1))
        rep.finish("train x")
        rep.start("train x", total=10)  # the same name again (e.g. one download per file): logs from 0% again
        for _ in range(10):
            rep.advance("train x", 1)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("  train x: ")]
    expected = [f"{k}/50" for k in range(5, 50, 5)] + [f"{k}/10" for k in range(1, 10)]
    assert [ln.split()[2] for ln in lines] == expected, buf.getvalue()
    assert "loss=" in lines[8] and "50/50" in buf.getvalue()  # the final bar is written when the bars stop

    term = io.StringIO()
    with RichReporter(Console(file=term, force_terminal=True, width=120)) as rep:
        rep.start("t", total=10)
        rep.advance("t", 5)
    assert "  t: " not in term.getvalue()  # a terminal only gets the live bar

"""Killing ``compose`` at any stage leaves no output or a complete one (issue 9, item 12).

tests/test_compose.py interrupts compose in-process (KeyboardInterrupt at each stage) and sends
SIGTERM to the CLI at two moments. Here a compose process is SIGKILLed (nothing can clean up) at
each stage and at each step of the final write: while the checkpoint is staged, half-way through
moving its files, just before and just after the rename into place. With ``overwrite`` (``--force``)
over an existing checkpoint, a kill before or after the swap leaves the old or the new checkpoint,
complete, at the output path (never neither: ``atomic.exchange_paths``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import make_peft_adapter
from mergekit_moe.atomic import exchange_paths, leftover_staging
from mergekit_moe.checkpoint import load_checkpoint

_KILL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from mergekit_moe import atomic
    from mergekit_moe.compose import compose
    from mergekit_moe.progress import NullReporter

    recipe, point, out, overwrite = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class Killer(NullReporter):
        def start(self, task, total=None):
            if task == point:
                die()
            return super().start(task, total)

    real_replace = os.replace
    def replace(src, dst):
        if point == "checkpoint-staged" and ".checkpoint.staging-" in str(src):
            die()  # weights, card, config written in the inner staging dir
        if point == "moving-files" and str(dst).endswith("moe_config.json"):
            die()  # some checkpoint files moved into the output staging dir, some not
        if point == "before-rename" and Path(dst) == out:
            die()
        return real_replace(src, dst)
    os.replace = replace

    real_exchange = atomic.exchange_paths
    def exchange(a, b):
        if point == "before-swap":
            die()
        done = real_exchange(a, b)
        if point == "after-swap":
            die()  # the new checkpoint is in place, the old one not yet deleted
        return done
    atomic.exchange_paths = exchange

    real_fsync_dir = atomic._fsync_dir
    def fsync_dir(p):
        if point == "after-rename" and Path(p) == out.parent:
            die()
        return real_fsync_dir(p)
    atomic._fsync_dir = fsync_dir

    compose(recipe, reporter=Killer(), overwrite=overwrite)
    print("not killed")
""")

RECIPE = """base_model: ./base
experts:
  - {{name: a, source: ./exp-a}}
  - {{name: b, source: ./exp-b}}
output: {{path: ./{out}}}
"""


@pytest.fixture(scope="module")
def work(tiny_base, tmp_path_factory):
    w = tmp_path_factory.mktemp("kill-compose")
    (w / "base").symlink_to(tiny_base)
    for i, n in enumerate("ab"):
        make_peft_adapter(tiny_base, w / f"exp-{n}", r=4, seed=i, scale=0.05, targets=["q_proj", "v_proj"])
    (w / "kill.py").write_text(_KILL)
    return w


def _kill(work: Path, point: str, out_name: str, *, overwrite: bool = False) -> Path:
    recipe = work / f"{out_name}.yaml"
    recipe.write_text(RECIPE.format(out=out_name))
    out = work / out_name
    proc = subprocess.run([sys.executable, str(work / "kill.py"), str(recipe), point, str(out), "1" if overwrite else "0"],
                          capture_output=True, text=True, timeout=600, cwd=str(work),
                          env={**os.environ, "MOEMERGE_HOME": str(work / "home")})
    assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr[-2000:])
    return out


def _not_output(work: Path, out: Path) -> None:
    """What a kill may leave besides the output: only staging-named siblings, never a partial output."""
    assert not out.exists()
    for p in leftover_staging(work):
        assert p.name.startswith(f".{out.name}.") or p.name.startswith(".")


@pytest.mark.slow
@pytest.mark.parametrize("point,complete", [("router init", False), ("checkpoint-staged", False),
                                            ("moving-files", False), ("before-rename", False), ("after-rename", True)])
def test_sigkill_leaves_no_output_or_a_complete_one(work, point, complete):
    out = _kill(work, point, "out-" + point.replace(" ", "-"))
    if complete:
        spec = load_checkpoint(out)  # hashes verify, tensors validate
        assert set(spec.experts) >= {"a", "b"}
        assert (out / "compose_report.json").is_file()
    else:
        _not_output(work, out)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="atomic swap is Linux-only")
@pytest.mark.parametrize("point,expect", [("before-swap", "old"), ("after-swap", "new")])
def test_sigkill_during_forced_overwrite_leaves_old_or_new(work, point, expect):
    from mergekit_moe.compose import compose

    name = "over-" + point.replace(" ", "-")
    recipe = work / f"{name}.yaml"
    recipe.write_text(RECIPE.format(out=name))
    compose(recipe, method="linear")  # the existing output: a linear-merge baseline
    assert load_checkpoint(work / name).metrics["method"] == "linear"
    out = _kill(work, point, name, overwrite=True)
    spec = load_checkpoint(out)  # there is always a complete checkpoint at the output path
    assert spec.metrics["method"] == ("linear" if expect == "old" else "moe")


def test_exchange_paths_swaps_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not exchange_paths(a, b):
        pytest.skip("this filesystem or platform has no atomic exchange; staging_dir falls back to rename-aside")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    assert not exchange_paths(a, tmp_path / "missing")  # a failed swap reports False and changes nothing
    assert (a / "f").read_text() == "B"

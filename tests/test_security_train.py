"""Killing ``train`` at every point of a checkpoint save (issue 9, item 11).

tests/test_train_resume.py kills at one point (all files staged, marker not yet written) and after a
step. Here a real training process is SIGKILLed at each other moment of the save of step 6 (step 4
is the previous complete checkpoint): half-way through writing the trainer state, with the completion marker written but not renamed, just before the staging directory is
renamed into place, and half-way through pruning the oldest checkpoint after the rename. Each
time the newest complete checkpoint is loadable (``weights_only`` state, validated safetensors),
``resume`` picks the newest complete one, and the resumed run ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergekit_moe.safetensors_io import load_safetensors
from mergekit_moe.train_ckpt import STATE, TRAINER_STATE, latest_checkpoint, list_checkpoints, load_trainer_state

CFG = dict(max_steps=8, batch_size=4, save_every=2, eval_every=3, dropout=0.2, lr=1e-3, rank=4, max_length=64, seed=3)

_COMMON = textwrap.dedent("""
    import json, os, shutil, signal, sys
    import torch
    torch.set_num_threads(1)  # the same kernels in every process: bitwise comparisons are meaningful
    from mergekit_moe.progress import NullReporter
    from mergekit_moe.train import TrainConfig, train_expert
    base, data, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    def run(run_dir, out, resume=False):
        train_expert(base, TrainConfig(data=data, **cfg), name="killme", run_dir=run_dir, out_dir=out, resume=resume,
                     reporter=NullReporter())
""")

# SIGKILL this process at one moment of the save of step 6
_KILL = _COMMON + textwrap.dedent("""
    from mergekit_moe import train_ckpt, train_loop
    point = sys.argv[4]
    STEP = {"now": None}
    real_save = train_ckpt.save_checkpoint
    def save(run_dir, step, **kw):
        STEP["now"] = step
        return real_save(run_dir, step, **kw)
    train_loop.save_checkpoint = save
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    real_torch_save = torch.save
    def torch_save(obj, f, *a, **kw):
        if STEP["now"] == 6 and str(f).endswith("trainer_state.pt"):
            if point == "mid-trainer-state":
                import io
                buf = io.BytesIO()
                real_torch_save(obj, buf, *a, **kw)
                with open(f, "wb") as fh:
                    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
        return real_torch_save(obj, f, *a, **kw)
    torch.save = torch_save
    real_replace = os.replace
    def replace(src, dst):
        if STEP["now"] == 6:
            if point == "marker-not-renamed" and str(dst).endswith("complete.json"):
                die()
            if point == "before-rename" and str(dst).endswith("step-00000006"):
                die()
        return real_replace(src, dst)
    os.replace = replace
    real_rmtree = shutil.rmtree
    def rmtree(path, *a, **kw):
        if STEP["now"] == 6 and point == "mid-prune" and str(path).endswith("step-00000002"):
            os.unlink(os.path.join(path, "adapter_model.safetensors"))  # part of the old checkpoint is gone
            die()
        return real_rmtree(path, *a, **kw)
    shutil.rmtree = rmtree
    run(sys.argv[5], sys.argv[6])
    print("not killed")
""")

# one process: the uninterrupted reference, then every resume (one interpreter start for all)
_RESUME = _COMMON + textwrap.dedent("""
    run(sys.argv[4], sys.argv[5])
    for run_dir, out in zip(sys.argv[6::2], sys.argv[7::2]):
        run(run_dir, out, resume=True)
""")

# point -> step of the newest complete checkpoint after the kill
POINTS = {"mid-trainer-state": 4, "marker-not-renamed": 4, "before-rename": 4, "mid-prune": 6}


def _rows(path: Path) -> Path:
    import random

    rng = random.Random(0)
    rows = [{"prompt": f"Item {rng.randint(0, 99)}?", "response": rng.choice(["alpha", "beta", "gamma"])} for _ in range(14)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def killed_runs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-save")
    data = _rows(root / "data.jsonl")
    (root / "kill.py").write_text(_KILL)
    runs = {}
    for point in POINTS:
        run = root / point / "run"
        proc = subprocess.run([sys.executable, str(root / "kill.py"), str(tiny_base), str(data), json.dumps(CFG), point,
                               str(run), str(root / point / "out")], capture_output=True, text=True, timeout=600,
                              env={**__import__("os").environ, "MOEMERGE_HOME": str(root / "home")})
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr[-2000:])
        runs[point] = run
    return root, data, runs


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(POINTS))
def test_newest_complete_checkpoint_is_loadable_after_kill(killed_runs, point):
    _root, _data, runs = killed_runs
    run = runs[point]
    newest = latest_checkpoint(run)
    assert newest is not None and newest.step == POINTS[point]
    # it loads: trainer state with weights_only=True, weights through the validating reader
    state = load_trainer_state(newest)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    assert load_safetensors(newest.adapter_file)
    assert json.loads((newest.path / STATE).read_text())["step"] == POINTS[point]
    # whatever the kill left (a staging dir, a half-pruned old checkpoint) is never offered for resume
    assert all(c.path.name.startswith("step-") and ".staging-" not in c.path.name for c in list_checkpoints(run))
    if point == "mid-prune":
        assert [c.step for c in list_checkpoints(run)] == [6, 4]  # the half-deleted step 2 is not complete


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(killed_runs, tiny_base):
    root, data, runs = killed_runs
    (root / "resume.py").write_text(_RESUME)
    args = []
    for point, run in sorted(runs.items()):
        args += [str(run), str(root / point / "resumed")]
    proc = subprocess.run([sys.executable, str(root / "resume.py"), str(tiny_base), str(data), json.dumps(CFG),
                           str(root / "ref-run"), str(root / "ref-out"), *args], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MOEMERGE_HOME": str(root / "home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_safetensors(root / "ref-out" / "adapter_model.safetensors")
    assert ref
    for point in sorted(runs):
        out = root / point / "resumed"
        got = load_safetensors(out / "adapter_model.safetensors")
        assert got.keys() == ref.keys(), point
        for k in ref:
            assert torch.equal(got[k], ref[k]), (point, k)
        prov = json.loads((out / "expert.json").read_text())["provenance"]
        assert prov["resumed_from_step"] == POINTS[point], point


def _fake_checkpoint(run: Path, step: int, *, complete: bool) -> Path:
    from mergekit_moe.hashing import sha256_file

    d = run / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / STATE).write_text(json.dumps({"format_version": 1, "step": step}))
    (d / TRAINER_STATE).write_bytes(b"x")
    if complete:
        files = {p.name: sha256_file(p) for p in sorted(d.iterdir())}
        (d / "complete.json").write_text(json.dumps({"format_version": 1, "step": step, "files": files}))
    return d


def test_prune_removes_incomplete_checkpoints_older_than_the_newest(tmp_path):
    from mergekit_moe.train_ckpt import prune_checkpoints

    run = tmp_path / "run"
    old = _fake_checkpoint(run, 2, complete=False)
    _fake_checkpoint(run, 4, complete=True)
    _fake_checkpoint(run, 6, complete=True)
    prune_checkpoints(run, keep=2)
    assert [c.step for c in list_checkpoints(run)] == [6, 4]
    assert not old.exists()

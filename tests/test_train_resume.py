"""Checkpoint and resume: a killed run resumes to the bitwise-same adapter; kills during a save are harmless."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from mergekit_moe.errors import TrainError
from mergekit_moe.progress import NullReporter
from mergekit_moe.safetensors_io import load_safetensors
from mergekit_moe.train import TrainConfig, train_expert
from mergekit_moe.train_ckpt import TRAINER_STATE, latest_checkpoint, list_checkpoints

# dropout on and 2 epochs' worth of steps: the resumed run must restore RNG state and data position
FLAGS = ["--max-steps", "8", "--batch-size", "4", "--save-every", "2", "--eval-every", "3", "--dropout", "0.2",
         "--lr", "1e-3", "--rank", "4", "--max-length", "64", "--seed", "3"]


def write_rows(path: Path, n: int = 14, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [{"id": f"r{i}", "prompt": f"Item {rng.randint(0, 99)}?", "response": rng.choice(["alpha", "beta", "gamma"])}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def adapter_tensors(bundle_dir: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(bundle_dir) / "adapter_model.safetensors")


def train_cli(base, data, run_dir, out, *extra, env=None):
    return run_cli("train", "--base", base, "--data", data, "--name", "resumable", "--run-dir", run_dir, "--out", out,
                   *FLAGS, *extra, env=env)


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    """An uninterrupted run (its own registry home) and its data file."""
    d = tmp_path_factory.mktemp("reference")
    data = write_rows(d / "data.jsonl")
    proc = train_cli(tiny_base, data, d / "run", d / "out", env={"MOEMERGE_HOME": str(d / "home")})
    assert proc.returncode == 0, proc.stderr
    return data, adapter_tensors(d / "out")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_run_resumes_to_the_same_adapter(tiny_base, tmp_path, reference):
    data, ref = reference
    run, out = tmp_path / "run", tmp_path / "out"
    killed = train_cli(tiny_base, data, run, out, env={"MOEMERGE_FAULT": "step:5"})
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert [c.step for c in list_checkpoints(run)] == [4, 2]
    resumed = train_cli(tiny_base, data, run, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4" in resumed.stderr
    assert_bitwise_equal(adapter_tensors(out), ref)
    # the final bundle carries the resume in its provenance
    assert json.loads((out / "expert.json").read_text())["provenance"]["resumed_from_step"] == 4


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tiny_base, tmp_path, reference):
    data, ref = reference
    run, out = tmp_path / "run", tmp_path / "out"
    killed = train_cli(tiny_base, data, run, out, env={"MOEMERGE_FAULT": "save:6"})
    assert killed.returncode == -signal.SIGKILL
    ck_dir = run / "checkpoints"
    leftovers = [p.name for p in ck_dir.iterdir() if "staging" in p.name]
    assert leftovers and all("step-00000006" in n for n in leftovers)  # the half-written save is only a staging dir
    newest = latest_checkpoint(run)
    assert newest is not None and newest.step == 4
    state = torch.load(newest.path / TRAINER_STATE, weights_only=True)  # loadable without unpickling code
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    resumed = train_cli(tiny_base, data, run, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(adapter_tensors(out), ref)


def test_resume_refuses_changed_settings_unless_forced(tiny_base, tmp_path):
    data = write_rows(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), max_steps=3, batch_size=4, save_every=1, eval_every=0, lr=1e-3)
    train_expert(tiny_base, cfg, name="r", run_dir=run, reporter=NullReporter())
    assert [c.step for c in list_checkpoints(run)] == [2, 1]

    changed_lr = TrainConfig(**{**cfg.to_dict(), "lr": 5e-3})
    with pytest.raises(TrainError, match=r"hyperparameters\.lr changed"):
        train_expert(tiny_base, changed_lr, name="r", run_dir=run, resume=True)
    other_data = write_rows(tmp_path / "other.jsonl", seed=9)
    with pytest.raises(TrainError, match="data_fingerprint changed"):
        train_expert(tiny_base, TrainConfig(**{**cfg.to_dict(), "data": str(other_data)}), name="r", run_dir=run, resume=True)

    rep = NullReporter()
    res = train_expert(tiny_base, changed_lr, name="r", run_dir=run, resume=True, force=True, reporter=rep)
    assert res.metrics["steps"] == 3
    assert any("--force" in w for w in rep.warnings) and any("resuming from step 2" in i for i in rep.infos)


def test_resume_skips_a_corrupted_newest_checkpoint(tiny_base, tmp_path):
    data = write_rows(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(data), max_steps=3, batch_size=4, save_every=1, eval_every=0)
    train_expert(tiny_base, cfg, name="c", run_dir=run)
    newest = latest_checkpoint(run)
    assert newest.step == 2
    blob = bytearray(newest.adapter_file.read_bytes())
    blob[-1] ^= 0xFF
    newest.adapter_file.write_bytes(bytes(blob))
    assert latest_checkpoint(run).step == 1
    (run / "checkpoints" / "step-00000001" / "complete.json").unlink()  # no marker: never resumed from
    assert latest_checkpoint(run) is None
    rep = NullReporter()
    train_expert(tiny_base, cfg, name="c", run_dir=run, resume=True, reporter=rep)
    assert any("starting from scratch" in i for i in rep.infos)


def test_second_run_on_the_same_run_dir_is_refused(tiny_base, tmp_path):
    from filelock import FileLock

    data = write_rows(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    with FileLock(str(run / ".lock")):  # what a concurrent `moemerge train` holds
        with pytest.raises(TrainError, match="another `moemerge train` is using this run directory"):
            train_expert(tiny_base, TrainConfig(data=str(data), max_steps=1), name="l", run_dir=run)
    res = train_expert(tiny_base, TrainConfig(data=str(data), max_steps=1, eval_every=0, save_every=0), name="l", run_dir=run)
    assert res.metrics["steps"] == 1

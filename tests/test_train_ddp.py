"""DDP: `moemerge train` under torchrun with 2 CPU processes (gloo) matches one process on the same global batch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, run_cli
from mergekit_moe.safetensors_io import load_safetensors

FLAGS = ["--max-steps", "4", "--batch-size", "6", "--grad-accum", "2", "--dropout", "0", "--lr", "2e-3", "--rank", "4",
         "--max-length", "64", "--save-every", "2", "--eval-every", "2", "--seed", "5"]


def write_rows(path: Path, n: int = 30) -> Path:
    rng = random.Random(1)
    # uneven lengths: ranks get different token counts, so the global-token loss normalisation matters
    rows = [{"id": f"r{i}", "prompt": "Q" + " word" * rng.randint(1, 12) + "?", "response": " ".join(["ok"] * rng.randint(1, 6))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_two_process_ddp_matches_one_process(tiny_base, tmp_path):
    data = write_rows(tmp_path / "d.jsonl")
    single = run_cli("train", "--base", tiny_base, "--data", data, "--name", "one", "--out", tmp_path / "one", *FLAGS)
    assert single.returncode == 0, single.stderr

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mergekit_moe",
           "train", "--base", str(tiny_base), "--data", str(data), "--name", "two", "--out", str(tmp_path / "two"), *FLAGS]
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("two@1") == 1  # only rank 0 prints and registers

    a = load_safetensors(tmp_path / "one" / "adapter_model.safetensors")
    b = load_safetensors(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if "lora_B" in k:  # B starts at zero: its whole value is what training did
            diff = (a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)
            assert diff < 1e-3, (k, float(diff))
        else:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    m1 = json.loads((tmp_path / "one" / "expert.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "two" / "expert.json").read_text())["metrics"]
    assert m2["processes"] == 2 and m1["tokens"] == m2["tokens"]
    assert abs(m1["val_loss"] - m2["val_loss"]) < 1e-4 and abs(m1["train_loss"] - m2["train_loss"]) < 1e-4


def test_accelerate_launch_runs_the_same_ddp(tiny_base, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (what docs/scaling.md shows) starts 2 processes through
    torchrun; without GPUs they use gloo, and the result equals one process on the same global batch."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        import pytest

        pytest.skip("accelerate is not installed (dev extra)")
    data = write_rows(tmp_path / "d.jsonl")
    single = run_cli("train", "--base", tiny_base, "--data", data, "--name", "one", "--out", tmp_path / "one", *FLAGS)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "mergekit_moe", "train", "--base", str(tiny_base), "--data", str(data),
           "--name", "acc", "--out", str(tmp_path / "acc"), *FLAGS]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("acc@1") == 1
    m1 = json.loads((tmp_path / "one" / "expert.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "acc" / "expert.json").read_text())["metrics"]
    assert m2["processes"] == 2 and m1["tokens"] == m2["tokens"]
    assert abs(m1["train_loss"] - m2["train_loss"]) < 1e-4

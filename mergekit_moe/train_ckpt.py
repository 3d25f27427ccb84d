"""Training checkpoints: save atomically with a completion marker, find the newest complete one, resume.

A checkpoint is a directory ``<run_dir>/checkpoints/step-00000050/`` holding

* ``adapter_model.safetensors`` + ``adapter_config.json``: the LoRA weights (PEFT layout);
* ``trainer_state.pt``: optimizer and scheduler state and RNG states, saved with ``torch.save`` of
  tensors / plain containers only, so it loads with ``torch.load(..., weights_only=True)``;
* ``state.json``: step, data position (examples consumed), loss history, the run signature;
* ``complete.json``: the completion marker with the sha256 of every other file, written last.

The directory is built in a staging sibling and renamed into place, so a kill at any point leaves
the previous checkpoints untouched; a checkpoint without a valid marker is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json, staging_dir
from .errors import TrainError
from .hashing import sha256_file

FORMAT_VERSION = 1
MARKER = "complete.json"
STATE = "state.json"
TRAINER_STATE = "trainer_state.pt"
_PREFIX = "step-"


def fault_point(name: str, step: int) -> None:
    """Test hook: ``MOEMERGE_FAULT=<name>:<step>`` SIGKILLs this process here (simulates a crash)."""
    spec = os.environ.get("MOEMERGE_FAULT")
    if spec and spec == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """All RNG states as tensors / plain lists (``weights_only``-loadable)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    @property
    def adapter_file(self) -> Path:
        return self.path / "adapter_model.safetensors"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, peft_model, trainer_state: dict[str, Any],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; prune all but the newest ``keep`` complete ones."""
    import torch

    target = checkpoints_dir(run_dir) / f"{_PREFIX}{step:08d}"
    with staging_dir(target, overwrite=True) as stage:
        # PEFT writes adapter_model.safetensors + adapter_config.json (safetensors only)
        peft_model.save_pretrained(str(stage), safe_serialization=True, save_embedding_layers=False)
        for extra in ("README.md",):  # PEFT's model card stub is noise in a checkpoint
            (stage / extra).unlink(missing_ok=True)
        torch.save(trainer_state, stage / TRAINER_STATE)
        atomic_write_json(stage / STATE, {"format_version": FORMAT_VERSION, "step": step, **state})
        fault_point("save", step)  # a crash here must leave the previous checkpoint resumable
        files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()}
        atomic_write_json(stage / MARKER, {"format_version": FORMAT_VERSION, "step": step, "files": files})
    prune_checkpoints(run_dir, keep)
    return target


def _is_complete(path: Path) -> dict[str, Any] | None:
    """The parsed ``state.json`` if ``path`` is a complete, unmodified checkpoint, else None."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        for name, digest in marker["files"].items():
            if sha256_file(path / name) != digest:
                return None
        return json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints, newest first (incomplete or corrupted ones are skipped)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if not (p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()):
            continue
        state = _is_complete(p)
        if state is not None:
            out.append(Checkpoint(p, int(state["step"]), state))
    return sorted(out, key=lambda c: c.step, reverse=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    cks = list_checkpoints(run_dir)
    return cks[0] if cks else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, incomplete ones older than the newest, and
    staging leftovers of interrupted saves (the run directory is locked, so no other save is in flight)."""
    cks = list_checkpoints(run_dir)
    for c in cks[max(keep, 1):]:
        shutil.rmtree(c.path, ignore_errors=True)
    if not cks:
        return
    complete = {c.path.name for c in cks}
    for p in checkpoints_dir(run_dir).iterdir():
        name = p.name
        stale_incomplete = (name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and name not in complete
                            and int(name[len(_PREFIX):]) < cks[0].step)
        leftover = name.startswith(f".{_PREFIX}") and (".staging-" in name or ".old-" in name)
        if p.is_dir() and (stale_incomplete or leftover):
            shutil.rmtree(p, ignore_errors=True)


def clear_checkpoints(run_dir: str | os.PathLike) -> None:
    shutil.rmtree(checkpoints_dir(run_dir), ignore_errors=True)


def load_trainer_state(ck: Checkpoint, map_location="cpu") -> dict[str, Any]:
    import torch

    # weights_only: the file holds tensors and plain containers; nothing is unpickled beyond that
    return torch.load(ck.path / TRAINER_STATE, map_location=map_location, weights_only=True)


def load_adapter_into(peft_model, ck: Checkpoint) -> None:
    """Copy the checkpoint's LoRA weights into ``peft_model`` (safetensors, validated)."""
    from peft import set_peft_model_state_dict

    from .safetensors_io import load_safetensors

    tensors = load_safetensors(ck.adapter_file)
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise TrainError(f"checkpoint tensors do not fit the model: {missing[:3]}", where=str(ck.path))


def signature_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys (dotted) where two run signatures differ."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in signature_diff(a, b)]
        elif a != b:
            diffs.append(key)
    return diffs

"""Composed checkpoints from elsewhere (issue 9, items 4 and 6): hostile moe_config.json and links.

The two gaps once marked ``xfail(strict=True)`` here (deeply nested moe_config.json, symlinked
checkpoint files) are fixed in checkpoint.py; their tests now run as plain tests.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_peft_adapter

from mergekit_moe.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint
from mergekit_moe.errors import FormatError, MoeMergeError


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory):
    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.lora import read_adapter
    from mergekit_moe.moe.spec import MoeSpec

    d = tmp_path_factory.mktemp("sec-ck")
    a = make_peft_adapter(tiny_base, d / "a", r=2, targets=["q_proj"], seed=1)
    spec = MoeSpec.from_experts(str(tiny_base), fingerprint_of(tiny_base), {"a": read_adapter(a)}, hidden_size=64,
                                model_type="llama")
    return save_checkpoint(spec, d / "ck", recipe_text="name: x\n")


def _copy(ckpt, tmp_path):
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(ckpt, out)
    return out


def test_reference_checkpoint_loads(ckpt):
    assert load_checkpoint(ckpt).experts


@pytest.mark.parametrize("name", ["../moe_lora.safetensors", "/etc/passwd", "sub/moe_lora.safetensors", ".."])
def test_manifest_names_outside_the_checkpoint_are_refused(ckpt, tmp_path, name):
    ck = _copy(ckpt, tmp_path)
    cfg = json.loads((ck / CONFIG).read_text())
    cfg["files"][name] = {"sha256": "0" * 64, "size": 1}
    (ck / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(MoeMergeError) as ei:
        load_checkpoint(ck)
    assert "\n" not in str(ei.value)


def test_crafted_weights_in_a_checkpoint_give_a_format_error(ckpt, tmp_path):
    ck = _copy(ckpt, tmp_path)
    w = ck / WEIGHTS
    w.write_bytes(w.read_bytes() + b"\0" * 8)
    cfg = json.loads((ck / CONFIG).read_text())
    from mergekit_moe.hashing import sha256_file

    cfg["files"][WEIGHTS] = {"sha256": sha256_file(w), "size": w.stat().st_size}  # a consistent forgery
    (ck / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="trailing bytes"):
        load_checkpoint(ck)


def test_deeply_nested_config_is_a_format_error(ckpt, tmp_path):
    ck = _copy(ckpt, tmp_path)
    (ck / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FormatError):
        load_checkpoint(ck)


def test_symlinked_checkpoint_file_is_refused(ckpt, tmp_path):
    ck = _copy(ckpt, tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    os.replace(ck / WEIGHTS, elsewhere)
    os.symlink(elsewhere, ck / WEIGHTS)
    with pytest.raises(MoeMergeError, match="link"):
        load_checkpoint(ck)

"""Lock files: format checks, and ``hub.fetch_expert`` pinning hf:// experts to commits and hashes."""

from __future__ import annotations

import json

import pytest
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN

from mergekit_moe.errors import FormatError, IntegrityError, UnsafeFileError
from mergekit_moe.hub import fetch_expert, push
from mergekit_moe.lockfile import LockEntry, LockFile, lock_path_for
from mergekit_moe.refs import parse_ref
from mergekit_moe.registry import Registry

SHA = "ab" * 20
H = "cd" * 32


def _write(path, experts):
    path.write_text(json.dumps({"format_version": 1, "experts": experts}))
    return path


def test_lock_path_and_roundtrip(tmp_path):
    assert lock_path_for(tmp_path / "recipe.yaml") == tmp_path / "recipe.lock.json"
    lock = LockFile.for_recipe(tmp_path / "recipe.yaml")
    assert lock.entries == {}
    ref = parse_ref("hf://medorg/dx@main:experts/dx")
    lock.set(ref, LockEntry("medorg/dx", "main", "experts/dx", SHA, {"adapter_model.safetensors": {"sha256": H, "size": 3}}, "d" * 64))
    assert lock.dirty
    lock.save()
    again = LockFile.load(lock.path)
    assert again.get(ref).commit == SHA and again.get(ref).files["adapter_model.safetensors"]["size"] == 3
    assert again.get(parse_ref("hf://medorg/dx@v2:experts/dx")) is None  # the revision is part of the name


@pytest.mark.parametrize("files, exc", [
    ({"../../etc/passwd": {"sha256": H, "size": 1}}, UnsafeFileError),
    ({"/abs/file": {"sha256": H, "size": 1}}, UnsafeFileError),
    ({"a\\..\\b": {"sha256": H, "size": 1}}, UnsafeFileError),
    ({"ok.json": {"sha256": "xyz", "size": 1}}, FormatError),
    ({"ok.json": {"sha256": H, "size": -1}}, FormatError),
    ({}, FormatError),
])
def test_bad_lock_entries_refused(tmp_path, files, exc):
    p = _write(tmp_path / "r.lock.json", {"hf://medorg/dx": {"repo": "medorg/dx", "commit": SHA, "files": files}})
    with pytest.raises(exc):
        LockFile.load(p)


def test_bad_commit_and_garbage_refused(tmp_path):
    p = _write(tmp_path / "a.lock.json", {"hf://medorg/dx": {"commit": "main", "files": {"x.json": {"sha256": H, "size": 1}}}})
    with pytest.raises(FormatError, match="40-hex"):
        LockFile.load(p)
    (tmp_path / "b.lock.json").write_text("{not json")
    with pytest.raises(FormatError):
        LockFile.load(tmp_path / "b.lock.json")
    p = _write(tmp_path / "c.lock.json", {"hf://medorg/dx:sub": {"subfolder": "other", "commit": SHA,
                                                                 "files": {"x.json": {"sha256": H, "size": 1}}}})
    with pytest.raises(FormatError, match="does not match its key"):
        LockFile.load(p)


def _second_version(tiny_base, tmp_path):
    from helpers import make_peft_adapter

    from mergekit_moe.bundle import bundle_from_adapter

    return bundle_from_adapter(make_peft_adapter(tiny_base, tmp_path / "a2", seed=11), tmp_path / "b2", name="dx",
                               task="diagnosis", base=str(tiny_base)).path


def test_fetch_expert_locks_and_detects_changed_content(hub_env_lfs, expert_bundle, tiny_base, tmp_path):
    url = hub_env_lfs.url
    first = push(expert_bundle[0], "medorg/dx", endpoint=url, token=TOKEN)
    reg = Registry(tmp_path / "reg")
    ref = parse_ref("hf://medorg/dx")
    lock = LockFile.for_recipe(tmp_path / "recipe.yaml")
    e1 = fetch_expert(ref, reg, lock=lock, update=False, endpoint=url, token=TOKEN)
    assert lock.get(ref).commit == first.commit and lock.get(ref).digest == e1.digest
    lock.save()

    # a later run with the lock: same entry, nothing downloaded
    hub_env_lfs.server.requests.clear()
    lock = LockFile.for_recipe(tmp_path / "recipe.yaml")
    assert fetch_expert(ref, reg, lock=lock, update=False, endpoint=url, token=TOKEN).digest == e1.digest
    assert not any("/resolve/" in p for _m, p in hub_env_lfs.server.requests)

    # a fresh machine (empty registry) with the lock: pulls the locked commit, byte-checked
    reg2 = Registry(tmp_path / "reg2")
    assert fetch_expert(ref, reg2, lock=lock, update=False, endpoint=url, token=TOKEN).digest == e1.digest

    # the same name now serves other content: refused unless --update
    second = push(_second_version(tiny_base, tmp_path), "medorg/dx", endpoint=url, token=TOKEN)
    with pytest.raises(IntegrityError, match="--update"):
        fetch_expert(ref, reg, lock=lock, update=False, endpoint=url, token=TOKEN)
    e2 = fetch_expert(ref, reg, lock=lock, update=True, endpoint=url, token=TOKEN)
    assert e2.digest != e1.digest and lock.get(ref).commit == second.commit and lock.dirty


def test_locked_commit_serving_other_bytes_fails(hub_env_lfs, expert_bundle, tmp_path):
    url = hub_env_lfs.url
    push(expert_bundle[0], "medorg/dx", endpoint=url, token=TOKEN)
    ref = parse_ref("hf://medorg/dx")
    lock = LockFile(tmp_path / "r.lock.json")
    fetch_expert(ref, Registry(tmp_path / "reg"), lock=lock, update=False, endpoint=url, token=TOKEN)
    entry = lock.get(ref)
    # the lock says expert.json had other bytes: the server's answer no longer matches the lock
    entry.files["adapter_config.json"] = {"sha256": H, "size": entry.files["adapter_config.json"]["size"]}
    entry.digest = ""
    reg2 = Registry(tmp_path / "reg2")
    with pytest.raises(IntegrityError, match="different content than the lock"):
        fetch_expert(ref, reg2, lock=lock, update=False, endpoint=url, token=TOKEN)
    assert reg2.find() == []


def test_locked_copy_is_used_offline(hub_env_lfs, expert_bundle, tmp_path, monkeypatch):
    from huggingface_hub import constants

    url = hub_env_lfs.url
    push(expert_bundle[0], "medorg/dx", endpoint=url, token=TOKEN)
    reg, ref = Registry(tmp_path / "reg"), parse_ref("hf://medorg/dx")
    lock = LockFile(tmp_path / "r.lock.json")
    e1 = fetch_expert(ref, reg, lock=lock, update=False, endpoint=url, token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch_expert(ref, reg, lock=lock, update=False, endpoint=url, token=TOKEN).digest == e1.digest
    from mergekit_moe.errors import HubError

    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):  # nothing locally for a fresh registry
        fetch_expert(ref, Registry(tmp_path / "empty"), lock=lock, update=False, endpoint=url, token=TOKEN)

"""Hub pulls against hostile repos and killed processes (issue 9, items 3, 7, 8).

Complements tests/test_hub_pull.py: a pickle disguised under an allowed name is never unpickled,
pickle/code names are refused whatever their case or folder, ``auto_map`` in any JSON file of a
verified bundle is refused, and a pull process SIGKILLed in the middle of a (resumed) download
leaves no registry entry and no file outside a staging directory that ``gc`` removes.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN

from mergekit_moe.errors import FormatError, MoeMergeError, UnsafeFileError
from mergekit_moe.hub import pull, push
from mergekit_moe.registry import Registry

REPO = "medorg/hostile"


class _Canary:
    """Unpickling this writes a file: if the canary exists, something was deserialized."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def _plain_files(adapter_dir: Path) -> dict[str, bytes]:
    return {n: (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_pickle_disguised_as_safetensors_is_never_unpickled(hub_env_lfs, expert_bundle, tmp_path):
    canary = tmp_path / "canary.txt"
    files = _plain_files(expert_bundle[1])
    files["adapter_model.safetensors"] = pickle.dumps({"w": _Canary(canary)})
    hub_env_lfs.server.put_files(REPO, files)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN, task="t")
    assert not canary.exists()
    assert reg.find() == [] and (not reg.store.exists() or list(reg.store.iterdir()) == [])


def test_torch_zip_pickle_disguised_as_safetensors_is_never_unpickled(hub_env_lfs, expert_bundle, tmp_path):
    import torch

    canary = tmp_path / "canary.txt"
    files = _plain_files(expert_bundle[1])
    blob = tmp_path / "evil.pt"
    torch.save({"w": _Canary(canary)}, blob)  # the zip container torch.save writes
    files["adapter_model.safetensors"] = blob.read_bytes()
    hub_env_lfs.server.put_files(REPO, files)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(FormatError):
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN, task="t")
    assert not canary.exists() and reg.find() == []


@pytest.mark.parametrize("bad", ["ADAPTER_MODEL.BIN", "sub/optimizer.Pt", "weights.pkl", "model.ckpt", "arr.npy", "x.joblib",
                                 "hook.PY", "native.so", "setup.sh", "notebook.ipynb", "archive.tar.gz", "weights.safetensors.bin"])
def test_pickle_and_code_names_refused_whatever_case_or_folder(hub_env_lfs, expert_bundle, tmp_path, bad):
    canary = tmp_path / "canary.txt"
    files = _plain_files(expert_bundle[1])
    files[bad] = pickle.dumps(_Canary(canary))
    hub_env_lfs.server.put_files(REPO, files)
    hub_env_lfs.server.requests.clear()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UnsafeFileError, match=bad.replace(".", r"\.")):
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN, task="t")
    assert not any("/resolve/" in p for _m, p in hub_env_lfs.server.requests)  # refused before any download
    assert not canary.exists() and reg.find() == []


@pytest.mark.parametrize("cfg_name", ["config.json", "sub/tokenizer_config.json", "adapter_config.json"])
def test_auto_map_in_any_json_of_a_verified_bundle_is_refused(hub_env_lfs, expert_bundle, tmp_path, cfg_name):
    from mergekit_moe.bundle import read_bundle, write_bundle

    src = read_bundle(expert_bundle[0])
    evil_cfg = tmp_path / "evil.json"
    if cfg_name == "adapter_config.json":
        cfg = json.loads((expert_bundle[1] / "adapter_config.json").read_text())
        cfg["auto_map"] = {"AutoModel": "modeling_evil.Evil"}
        ad = tmp_path / "ad"
        ad.mkdir()
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
        (ad / "adapter_model.safetensors").write_bytes((expert_bundle[1] / "adapter_model.safetensors").read_bytes())
        b = write_bundle(tmp_path / "b", ad, src.meta)
    else:
        evil_cfg.write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
        b = write_bundle(tmp_path / "b", expert_bundle[1], src.meta, extra_files={cfg_name: evil_cfg})
    b.verify()  # the bundle is internally consistent: only the auto_map check can stop it
    hub_env_lfs.server.put_files(REPO, {rel: (b.path / rel).read_bytes() for rel in [*b.files, "expert.json"]})
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UnsafeFileError, match=rf"{cfg_name.replace('.', '[.]')} asks for remote code \(auto_map\)"):
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN)
    assert reg.find() == [] and (not reg.store.exists() or list(reg.store.iterdir()) == [])


def test_pull_pins_a_40_hex_commit_even_for_a_branch_or_tag_name(hub_env_lfs, expert_bundle, tmp_path):
    res = push(expert_bundle[0], REPO, endpoint=hub_env_lfs.url, token=TOKEN)
    reg = Registry(tmp_path / "reg")
    got = pull(f"{REPO}@main", reg, endpoint=hub_env_lfs.url, token=TOKEN)
    commit = got.entry.provenance["commit"]
    assert commit == res.commit and len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    assert got.entry.provenance["revision"] == "main"  # what the user asked for is kept next to what it meant


def test_killed_pull_process_leaves_no_entry_and_gc_cleans_up(hub_env_lfs, expert_bundle, tmp_path):
    """SIGKILL while adapter_model.safetensors is half downloaded (first GET cut at 1000 bytes, the resumed
    GET stalls): no registry entry, nothing in the store but a staging dir, and a later pull is clean."""
    srv = hub_env_lfs.server
    push(expert_bundle[0], REPO, endpoint=hub_env_lfs.url, token=TOKEN)
    home = tmp_path / "home"
    Registry(home).add(expert_bundle[0], name="already-there")  # a non-empty registry that must stay as it was
    index_before = (home / "index.sqlite").read_bytes()
    srv.truncate(REPO, "adapter_model.safetensors", keep=1000, times=1)
    release = threading.Event()
    calls = {"n": 0}

    def stall_on_resume(data: bytes) -> bytes:
        calls["n"] += 1
        if calls["n"] >= 2:  # the client's Range request after the cut: hold it until the test ends
            release.wait(60)
        return data

    srv.tamper(REPO, "adapter_model.safetensors", stall_on_resume)
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_moe", "pull", REPO],
                            env=hub_env_lfs.env(MOEMERGE_HOME=str(home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while calls["n"] < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert calls["n"] >= 2, (proc.poll(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "")
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    reg = Registry(home)
    assert [e.name for e in reg.find()] == ["already-there"]
    assert (home / "index.sqlite").read_bytes() == index_before
    others = [p.name for p in reg.store.iterdir() if p.name != reg.find()[0].digest]
    assert others and all(n.startswith(".pull.staging-") for n in others), others  # the partial data is only in staging
    partial = [p for p in reg.store.rglob("*") if p.is_file() and ".pull.staging-" in str(p)]
    assert partial, "the kill should have caught a download in flight"
    junk = reg.gc()
    assert {p.name for p in junk} == set(others)
    assert [p.name for p in reg.store.iterdir()] == [reg.find()[0].digest]
    srv.state.tampered.clear()
    got = pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN)
    assert got.verified and sorted(e.name for e in reg.find()) == ["already-there", "dx"]
    reg.verify("dx")


def test_errors_from_hostile_repos_are_one_line(hub_env_lfs, expert_bundle, tmp_path):
    files = _plain_files(expert_bundle[1])
    files["adapter_config.json"] = b"[" * 100_000  # deeply nested JSON
    hub_env_lfs.server.put_files(REPO, files)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(MoeMergeError) as ei:
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN, task="t")
    assert "adapter_config.json" in str(ei.value) and "\n" not in str(ei.value)
    assert reg.find() == []


@pytest.mark.parametrize("damage", ["flip", "extra-py", "drop-readme"])
def test_cli_push_of_a_bundle_that_does_not_verify_sends_no_request(hub_env_lfs, expert_bundle, tmp_path, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(expert_bundle[0], bad)
    if damage == "flip":
        data = bytearray((bad / "adapter_model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    elif damage == "extra-py":
        (bad / "modeling_evil.py").write_text("import os\n")
    else:
        (bad / "README.md").unlink()
    hub_env_lfs.server.requests.clear()
    p = hub_env_lfs.run("push", bad, "medorg/pushed", env={"MOEMERGE_HOME": str(tmp_path / "home")})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert {"flip": "adapter_model.safetensors", "extra-py": "modeling_evil.py", "drop-readme": "README.md"}[damage] in p.stderr
    assert hub_env_lfs.server.requests == []  # not even a whoami: verification comes first

"""``moemerge push`` / ``pull`` / ``search`` as subprocesses with HF_ENDPOINT, HF_TOKEN and a private HF_HOME."""

from __future__ import annotations

import importlib.util
import re

import pytest
from hub_fixtures import *  # noqa: F403

from mergekit_moe.hashing import sha256_file
from mergekit_moe.registry import Registry


def _commit(text: str) -> str:
    m = re.search(r"commit\s+([0-9a-f]{40})", text)
    assert m, text
    return m.group(1)


def test_push_then_pull_roundtrip(hub_env, expert_bundle, tmp_path):
    """Both upload modes: LFS (HF_HUB_DISABLE_XET=1) and all-regular with Xet left on."""
    bdir, _ = expert_bundle
    home = tmp_path / "home"
    p = hub_env.run("push", bdir, "medorg/dx-expert", "--message", "first expert", env={"MOEMERGE_HOME": str(home)})
    assert p.returncode == 0, p.stderr
    sha = _commit(p.stdout)
    assert hub_env.server.repo("medorg/dx-expert").head().oid == sha
    assert "new commit" in p.stdout and f"{hub_env.url}/medorg/dx-expert" in p.stdout
    assert hub_env.server.repo("medorg/dx-expert").head().title == "first expert"
    lfs = hub_env.server.repo("medorg/dx-expert").head().files["adapter_model.safetensors"].lfs
    assert lfs == (hub_env.mode == "lfs")

    again = hub_env.run("push", bdir, "medorg/dx-expert", env={"MOEMERGE_HOME": str(home)})
    assert again.returncode == 0, again.stderr
    assert _commit(again.stdout) == sha and "unchanged" in again.stdout
    assert hub_env.server.commit_count("medorg/dx-expert") == 2

    q = hub_env.run("pull", "medorg/dx-expert", env={"MOEMERGE_HOME": str(home)})
    assert q.returncode == 0, q.stderr
    assert _commit(q.stdout) == sha and "verified" in q.stdout
    (entry,) = Registry(home).find()
    for rel in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(entry.path / rel) == sha256_file(bdir / rel)
    assert entry.provenance["commit"] == sha

    twice = hub_env.run("pull", "medorg/dx-expert", env={"MOEMERGE_HOME": str(home)})
    assert twice.returncode == 0 and "Already registered" in twice.stdout
    assert len(Registry(home).find()) == 1


@pytest.mark.skipif(importlib.util.find_spec("hf_xet") is None, reason="hf_xet not installed: the client never tries Xet")
def test_push_falls_back_to_lfs_when_the_server_has_no_xet(hub_env_lfs, expert_bundle, tmp_path):
    """A classic-LFS server (no Xet) with hf_xet installed and Xet left on: the client's Xet attempt
    fails on xet-write-token (501), push says so and commits through LFS instead."""
    bdir, _ = expert_bundle
    home = tmp_path / "home"
    env = {"MOEMERGE_HOME": str(home), "HF_HUB_DISABLE_XET": "0"}
    p = hub_env_lfs.run("push", bdir, "medorg/dx-expert", env=env)
    assert p.returncode == 0, p.stderr
    assert "does not support Xet" in p.stderr
    head = hub_env_lfs.server.repo("medorg/dx-expert").head()
    assert head.oid == _commit(p.stdout) and head.files["adapter_model.safetensors"].lfs
    assert hub_env_lfs.server.commit_count("medorg/dx-expert") == 2  # the initial commit + one push, nothing half-done
    q = hub_env_lfs.run("pull", "medorg/dx-expert", env=env)
    assert q.returncode == 0, q.stderr
    (entry,) = Registry(home).find()
    assert sha256_file(entry.path / "adapter_model.safetensors") == sha256_file(bdir / "adapter_model.safetensors")


def test_xet_disabled_restores_the_flag():
    from huggingface_hub import constants

    from mergekit_moe.hub_client import xet_disabled

    before = constants.HF_HUB_DISABLE_XET
    with pytest.raises(RuntimeError), xet_disabled():
        assert constants.HF_HUB_DISABLE_XET is True
        raise RuntimeError("boom")
    assert constants.HF_HUB_DISABLE_XET == before


def test_push_registry_name_and_search(hub_env_lfs, expert_bundle, tmp_path):
    home = tmp_path / "home"
    Registry(home).add(expert_bundle[0])
    p = hub_env_lfs.run("push", "dx", "medorg/dx-expert", "--subfolder", "v1", env={"MOEMERGE_HOME": str(home)})
    assert p.returncode == 0, p.stderr
    hub_env_lfs.server.put_files("medorg/unrelated", {"README.md": b"---\ntags: [other]\n---\n"})
    s = hub_env_lfs.run("search", "dx", env={"MOEMERGE_HOME": str(home)})
    assert s.returncode == 0, s.stderr
    assert "medorg/dx-expert" in s.stdout and "diagnosis" in s.stdout and "unrelated" not in s.stdout
    none = hub_env_lfs.run("search", "--task", "summarization", env={"MOEMERGE_HOME": str(home)})
    assert none.returncode == 0 and "no matching" in none.stdout


def test_one_line_errors(hub_env_lfs, expert_bundle, tmp_path):
    home = {"MOEMERGE_HOME": str(tmp_path / "home")}
    bad = hub_env_lfs.run("push", expert_bundle[0], "medorg/dx-expert", token="hf_bad", env=home)
    assert bad.returncode == 1 and "rejected the token" in bad.stderr and "Traceback" not in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.startswith("error:")]) == 1
    missing = hub_env_lfs.run("pull", "medorg/does-not-exist", env=home)
    assert missing.returncode == 1 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    offline = hub_env_lfs.run("pull", "medorg/dx-expert", env={**home, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "HF_HUB_OFFLINE" in offline.stderr
    down = hub_env_lfs.run("pull", "medorg/dx-expert", env={**home, "HF_ENDPOINT": "http://127.0.0.1:9",
                                                             "MOEMERGE_HUB_RETRIES": "0"})
    assert down.returncode == 1 and "cannot reach" in down.stderr
    assert Registry(tmp_path / "home").find() == []


def test_plain_peft_repo_shows_unverified_in_info(hub_env_lfs, expert_bundle, tmp_path):
    home = {"MOEMERGE_HOME": str(tmp_path / "home")}
    adapter = expert_bundle[1]
    hub_env_lfs.server.put_files("community/lora", {n: (adapter / n).read_bytes()
                                                    for n in ("adapter_config.json", "adapter_model.safetensors")})
    q = hub_env_lfs.run("pull", "community/lora", "--task", "diagnosis", env=home)
    assert q.returncode == 0, q.stderr
    assert "unverified" in q.stdout
    info = hub_env_lfs.run("info", "lora", env=home)
    if info.returncode == 0:  # `info` belongs to the registry commands; checked when present
        assert "unverified" in info.stdout


@pytest.mark.parametrize("bad_name", ["adapter_model.bin"])
def test_repo_with_bin_is_refused(hub_env_lfs, expert_bundle, tmp_path, bad_name):
    home = {"MOEMERGE_HOME": str(tmp_path / "home")}
    adapter = expert_bundle[1]
    hub_env_lfs.server.put_files("community/pickled", {"adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
                                                       bad_name: b"\x80\x04not really a pickle"})
    q = hub_env_lfs.run("pull", "community/pickled", env=home)
    assert q.returncode == 1 and bad_name in q.stderr and "pickle" in q.stderr
    assert Registry(tmp_path / "home").find() == []


def test_two_concurrent_pull_processes_leave_one_entry(hub_env_lfs, expert_bundle, tmp_path):
    import subprocess
    import sys

    from mergekit_moe.hub import push

    push(expert_bundle[0], "medorg/dx-expert", endpoint=hub_env_lfs.url, token="hf_test_write")
    env = hub_env_lfs.env(MOEMERGE_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-m", "mergekit_moe", "pull", "medorg/dx-expert"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (entry,) = Registry(tmp_path / "home").find()
    assert entry.provenance["commit"] == hub_env_lfs.server.repo("medorg/dx-expert").head().oid


def test_token_from_hf_auth_login_file(hub_env_lfs, expert_bundle, tmp_path):
    """No HF_TOKEN: the token saved by `hf auth login` under HF_HOME is used; without either, push is refused."""
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    (tmp_path / "hf-home" / "token").write_text("hf_test_write")
    ok = hub_env_lfs.run("push", expert_bundle[0], "medorg/dx-expert", token=None, env={"MOEMERGE_HOME": str(tmp_path / "h")})
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "hf-home" / "token").unlink()
    anon = hub_env_lfs.run("push", expert_bundle[0], "medorg/dx-expert2", token=None, env={"MOEMERGE_HOME": str(tmp_path / "h")})
    assert anon.returncode == 1 and "error:" in anon.stderr and "Traceback" not in anon.stderr

"""The test Hub server speaks the protocol the real huggingface_hub client expects (raw client flows)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN


@pytest.fixture
def api(hub_env):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_env.url, token=TOKEN)


def test_create_upload_download_both_modes(hub_env, api, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    assert api.whoami()["name"] == "alice"
    url = api.create_repo("medorg/raw")
    assert url.endswith("/medorg/raw") and api.create_repo("medorg/raw", exist_ok=True) == url  # 409 + url body
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "notes.txt").write_text("hello")
    c1 = api.upload_folder(repo_id="medorg/raw", folder_path=src, commit_message="one")
    (src / "sub" / "notes.txt").write_text("changed")
    c2 = api.upload_folder(repo_id="medorg/raw", folder_path=src, commit_message="two")
    assert c1.oid != c2.oid
    files = {f.path: f for f in api.list_repo_tree("medorg/raw", recursive=True) if hasattr(f, "size")}
    assert (files["w.safetensors"].lfs is not None) == (hub_env.mode == "lfs")
    out = snapshot_download("medorg/raw", revision=c1.oid, local_dir=tmp_path / "old", endpoint=hub_env.url, token=TOKEN)
    assert (tmp_path / "old" / "sub" / "notes.txt").read_text() == "hello" and out
    p = hf_hub_download("medorg/raw", "sub/notes.txt", local_dir=tmp_path / "new", endpoint=hub_env.url, token=TOKEN)
    assert open(p).read() == "changed"
    assert [c.commit_id for c in api.list_repo_commits("medorg/raw")][:2] == [c2.oid, c1.oid]


def test_errors_are_typed(hub_env_lfs, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as e

    api = HfApi(endpoint=hub_env_lfs.url, token=TOKEN)
    api.create_repo("medorg/secret", private=True)
    with pytest.raises(e.RepositoryNotFoundError):
        HfApi(endpoint=hub_env_lfs.url, token="hf_test_bob").repo_info("medorg/secret")
    with pytest.raises(e.RevisionNotFoundError):
        api.repo_info("medorg/secret", revision="nope")
    with pytest.raises(e.RemoteEntryNotFoundError):
        hf_hub_download("medorg/secret", "missing.json", endpoint=hub_env_lfs.url, token=TOKEN, local_dir=tmp_path)
    with pytest.raises(e.HfHubHTTPError) as bad:
        HfApi(endpoint=hub_env_lfs.url, token="hf_nope").whoami()
    assert bad.value.response.status_code == 401
    with pytest.raises(e.HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="medorg/secret", parent_commit="0" * 40)
    assert stale.value.response.status_code == 412
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id="medorg/secret")
    req = urllib.request.Request(f"{hub_env_lfs.url}/api/models/medorg/secret/xet-read-token/main",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as xet:
        urllib.request.urlopen(req)
    assert xet.value.code == 501


def test_range_requests_and_search(hub_env_lfs):
    srv = hub_env_lfs.server
    srv.put_files("medorg/a", {"README.md": b"---\ntags: [moemerge, task:triage]\nbase_model: org/base\n---\n",
                               "w.safetensors": b"0123456789" * 10})
    srv.put_files("other/b", {"README.md": b"---\ntags: [moemerge]\n---\n"})
    srv.put_files("other/c", {"README.md": b"---\ntags: [unrelated]\n---\n"})
    req = urllib.request.Request(f"{hub_env_lfs.url}/medorg/a/resolve/main/w.safetensors", headers={"Range": "bytes=5-14"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == b"5678901234"
        assert r.headers["Content-Range"] == "bytes 5-14/100" and len(r.headers["X-Repo-Commit"]) == 40
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_env_lfs.url)
    assert sorted(m.id for m in api.list_models(filter="moemerge")) == ["medorg/a", "other/b"]
    assert [m.id for m in api.list_models(filter="moemerge", author="medorg")] == ["medorg/a"]
    (hit,) = api.list_models(search="a", filter=["moemerge", "base_model:org/base"])
    assert "task:triage" in hit.tags and hit.last_modified is not None
    with urllib.request.urlopen(f"{hub_env_lfs.url}/api/models?filter=moemerge&limit=1") as r:
        assert len(json.loads(r.read())) == 1

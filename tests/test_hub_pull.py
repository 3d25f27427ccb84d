"""Hub push/pull in-process against the local Hub server: verification, refusals, no partial state."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from pathlib import Path

import pytest
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN

from mergekit_moe.atomic import leftover_staging
from mergekit_moe.errors import HubError, IntegrityError, UnsafeFileError
from mergekit_moe.hashing import sha256_file
from mergekit_moe.hub import pull, push
from mergekit_moe.registry import Registry

REPO = "medorg/dx-expert"


def _push(env, bundle_dir, repo=REPO, **kw):
    return push(bundle_dir, repo, endpoint=env.url, token=TOKEN, **kw)


def _pull(env, ref, reg, **kw):
    return pull(ref, reg, endpoint=env.url, token=TOKEN, **kw)


def _assert_nothing_left(reg: Registry) -> None:
    assert reg.find() == []
    if reg.store.exists():
        assert list(reg.store.iterdir()) == []  # no staging leftovers, no half-written bundle


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


def test_roundtrip_both_upload_modes(hub_env, expert_bundle, reg):
    bdir, _ = expert_bundle
    res = _push(hub_env, bdir)
    assert res.changed and len(res.commit) == 40
    blob = hub_env.server.repo(REPO).head().files["adapter_model.safetensors"]
    assert blob.lfs == (hub_env.mode == "lfs")  # the upload mode really differed
    again = _push(hub_env, bdir)
    assert not again.changed and again.commit == res.commit
    assert hub_env.server.commit_count(REPO) == 2  # initial commit + one push
    got = _pull(hub_env, REPO, reg)
    assert got.verified and got.commit == res.commit and not got.already
    for rel in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(got.entry.path / rel) == sha256_file(bdir / rel)
    assert got.entry.provenance["commit"] == res.commit
    assert got.entry.provenance["source"] == f"hf://{REPO}"
    from mergekit_moe.bundle import read_bundle

    local = read_bundle(bdir)
    assert got.entry.digest == local.digest  # the content address round-trips through the Hub
    assert read_bundle(got.entry.path).files == local.files
    same = _pull(hub_env, REPO, reg)
    assert same.already and same.entry.digest == got.entry.digest
    assert len(reg.find()) == 1


def test_model_card_front_matter(hub_env_lfs, expert_bundle):
    from mergekit_moe.modelcard import split_card

    _push(hub_env_lfs, expert_bundle[0], subfolder="experts/dx")
    files = hub_env_lfs.server.repo(REPO).head().files
    fm, body = split_card(files["experts/dx/README.md"].data.decode())
    assert fm["library_name"] == "peft" and "moemerge" in fm["tags"] and "task:diagnosis" in fm["tags"]
    assert "medical" in fm["tags"] and fm["datasets"] == ["medorg/dx-notes"] and fm["license"]
    assert "PeftModel.from_pretrained" in body and "accuracy" in body and "lora_alpha" in body
    root_fm, root_body = split_card(files["README.md"].data.decode())  # the Hub reads tags from the root card
    assert "moemerge" in root_fm["tags"] and "moemerge pull medorg/dx-expert:experts/dx" in root_body


def test_server_modified_safetensors_fails_and_registry_unchanged(hub_env_lfs, expert_bundle, reg):
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.tamper(REPO, "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        _pull(hub_env_lfs, REPO, reg)
    _assert_nothing_left(reg)


def test_consistently_replaced_file_fails_against_manifest(hub_env_lfs, expert_bundle, reg):
    """The listing and the bytes agree, but not with expert.json: the bundle manifest catches it."""
    bdir = expert_bundle[0]
    _push(hub_env_lfs, bdir)
    data = bytearray((bdir / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0x01
    hub_env_lfs.server.put_files(REPO, {"adapter_model.safetensors": bytes(data)})
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors.*sha256"):
        _pull(hub_env_lfs, REPO, reg)
    _assert_nothing_left(reg)


def test_truncated_download_leaves_nothing(hub_env_lfs, expert_bundle, reg, monkeypatch):
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd.time, "sleep", lambda s: None)  # the client waits 1 s between resume attempts
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.truncate(REPO, "adapter_model.safetensors", keep=0)
    with pytest.raises(HubError, match="adapter_model.safetensors"):
        _pull(hub_env_lfs, REPO, reg)
    _assert_nothing_left(reg)


def test_dropped_connection_is_resumed_with_range(hub_env_lfs, expert_bundle, reg, monkeypatch):
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd.time, "sleep", lambda s: None)
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.truncate(REPO, "adapter_model.safetensors", keep=1000, times=1)
    got = _pull(hub_env_lfs, REPO, reg)
    assert got.verified
    assert sha256_file(got.entry.path / "adapter_model.safetensors") == sha256_file(expert_bundle[0] / "adapter_model.safetensors")


def test_short_file_from_server_fails(hub_env_lfs, expert_bundle, reg):
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.tamper(REPO, "adapter_model.safetensors", lambda d: d[: len(d) // 2])
    with pytest.raises(HubError, match="adapter_model.safetensors"):
        _pull(hub_env_lfs, REPO, reg)
    _assert_nothing_left(reg)


class _Canary:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


@pytest.mark.parametrize("bad", ["training_args.bin", "optimizer.pt", "modeling_evil.py"])
def test_pickle_and_code_files_refused_before_download(hub_env_lfs, expert_bundle, reg, tmp_path, bad):
    canary = tmp_path / "canary.txt"
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.put_files(REPO, {bad: pickle.dumps(_Canary(canary))})
    hub_env_lfs.server.requests.clear()
    with pytest.raises(UnsafeFileError, match=bad.replace(".", r"\.")):
        _pull(hub_env_lfs, REPO, reg)
    assert not any("/resolve/" in p for _m, p in hub_env_lfs.server.requests)  # nothing was downloaded
    assert not canary.exists()
    _assert_nothing_left(reg)


def test_auto_map_in_config_refused(hub_env_lfs, expert_bundle, reg):
    _plain_repo(hub_env_lfs, expert_bundle[1], extra_cfg={"auto_map": {"AutoModel": "evil.Model"}})
    with pytest.raises(UnsafeFileError, match="auto_map"):
        _pull(hub_env_lfs, "medorg/plain", reg, task="diagnosis")
    _assert_nothing_left(reg)


def _plain_repo(env, adapter_dir: Path, *, extra_cfg=None, readme: bytes | None = None, repo="medorg/plain") -> None:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg.update(extra_cfg or {})
    files = {"adapter_config.json": json.dumps(cfg).encode(),
             "adapter_model.safetensors": (adapter_dir / "adapter_model.safetensors").read_bytes()}
    if readme is not None:
        files["README.md"] = readme
    env.server.put_files(repo, files)


def test_plain_peft_repo_is_unverified_provenance(hub_env_lfs, expert_bundle, reg):
    card = b"---\nlibrary_name: peft\ntags: [medical, task:triage]\nlicense: mit\n---\n# community adapter\n"
    _plain_repo(hub_env_lfs, expert_bundle[1], readme=card)
    got = _pull(hub_env_lfs, "medorg/plain", reg)
    assert not got.verified and got.entry.provenance["verified"] is False
    assert got.entry.name == "plain" and got.entry.task == "triage"
    assert len(got.entry.provenance["commit"]) == 40
    assert sha256_file(got.entry.path / "adapter_model.safetensors") == sha256_file(expert_bundle[1] / "adapter_model.safetensors")
    reg.verify(got.entry.ref)  # a proper bundle now: its manifest was computed on arrival


def test_hostile_model_card_is_bounded(hub_env_lfs, expert_bundle, reg):
    bomb = b"---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n" \
           b"tags: !!python/object/apply:os.system [echo pwned]\n---\n" + b"x" * 2_000_000
    _plain_repo(hub_env_lfs, expert_bundle[1], readme=bomb)
    got = _pull(hub_env_lfs, "medorg/plain", reg, task="diagnosis")
    assert got.entry.task == "diagnosis" and got.entry.tags == []


def test_manifest_path_escape_refused(hub_env_lfs, expert_bundle, reg, tmp_path):
    bdir = expert_bundle[0]
    _push(hub_env_lfs, bdir)
    ej = json.loads((bdir / "expert.json").read_text())
    ej["files"]["../../escaped.json"] = {"sha256": "0" * 64, "size": 2}
    ej.pop("digest")
    hub_env_lfs.server.put_files(REPO, {"expert.json": json.dumps(ej).encode()})
    with pytest.raises(UnsafeFileError, match="escapes"):
        _pull(hub_env_lfs, REPO, reg)
    assert not (reg.home / "escaped.json").exists() and not (reg.store.parent.parent / "escaped.json").exists()
    _assert_nothing_left(reg)


def test_manifest_file_missing_in_repo(hub_env_lfs, expert_bundle, reg):
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.put_files(REPO, {}, delete=("adapter_config.json",))
    with pytest.raises(IntegrityError, match="adapter_config.json is in the manifest but not in the repo"):
        _pull(hub_env_lfs, REPO, reg)
    _assert_nothing_left(reg)


def test_pull_older_revision_and_branch(hub_env_lfs, expert_bundle, tiny_base, tmp_path, reg):
    from helpers import make_peft_adapter

    from mergekit_moe.bundle import bundle_from_adapter

    first = _push(hub_env_lfs, expert_bundle[0])
    other = bundle_from_adapter(make_peft_adapter(tiny_base, tmp_path / "a2", seed=9), tmp_path / "b2", name="dx",
                                task="diagnosis", base=str(tiny_base), version="2")
    second = _push(hub_env_lfs, other.path)
    assert second.changed and second.commit != first.commit
    old = _pull(hub_env_lfs, f"{REPO}@{first.commit}", reg)
    new = _pull(hub_env_lfs, REPO, reg)
    assert old.commit == first.commit and new.commit == second.commit
    assert sha256_file(old.entry.path / "adapter_model.safetensors") == sha256_file(expert_bundle[0] / "adapter_model.safetensors")
    assert sha256_file(new.entry.path / "adapter_model.safetensors") == sha256_file(other.path / "adapter_model.safetensors")
    dev = _push(hub_env_lfs, expert_bundle[0], revision="dev", subfolder="experts/dx")
    assert hub_env_lfs.server.repo(REPO).branches["dev"] == dev.commit
    assert hub_env_lfs.server.repo(REPO).branches["main"] == second.commit  # main untouched
    got = _pull(hub_env_lfs, f"{REPO}@dev:experts/dx", reg, name="dx-dev")
    assert got.entry.name == "dx-dev" and got.commit == dev.commit


def test_push_refuses_unverifiable_bundle_before_any_request(hub_env_lfs, expert_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(expert_bundle[0], bad)
    data = bytearray((bad / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    hub_env_lfs.server.requests.clear()
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        _push(hub_env_lfs, bad)
    evil = tmp_path / "evil"
    shutil.copytree(expert_bundle[0], evil)
    (evil / "hook.py").write_text("import os\n")
    with pytest.raises(IntegrityError, match="hook.py"):
        _push(hub_env_lfs, evil)
    assert hub_env_lfs.server.requests == []


def test_retries_server_errors(hub_env_lfs, expert_bundle, reg):
    _push(hub_env_lfs, expert_bundle[0])
    hub_env_lfs.server.fail_next(2, 503, match=r"^GET /api/models/")
    got = _pull(hub_env_lfs, REPO, reg)
    assert got.verified
    hub_env_lfs.server.fail_next(10, 500, match=r"^GET /api/models/")
    with pytest.raises(HubError, match="500 after 4 attempt"):
        _pull(hub_env_lfs, REPO, Registry(reg.home.parent / "r2"))


def test_missing_repo_revision_subfolder_and_bad_token(hub_env_lfs, expert_bundle, reg):
    with pytest.raises(HubError, match="repo medorg/nope not found"):
        _pull(hub_env_lfs, "medorg/nope", reg)
    _push(hub_env_lfs, expert_bundle[0])
    with pytest.raises(HubError, match="revision 'v9' not found"):
        _pull(hub_env_lfs, f"{REPO}@v9", reg)
    with pytest.raises(HubError, match="not found"):
        _pull(hub_env_lfs, f"{REPO}:no/such/folder", reg)
    with pytest.raises(HubError, match="rejected the token"):
        pull(REPO, reg, endpoint=hub_env_lfs.url, token="hf_wrong")
    with pytest.raises(HubError, match="rejected the token"):
        push(expert_bundle[0], REPO, endpoint=hub_env_lfs.url, token="hf_wrong")
    with pytest.raises(HubError, match="403"):
        push(expert_bundle[0], "medorg/other", endpoint=hub_env_lfs.url, token="hf_test_bob")
    _assert_nothing_left(reg)


def test_no_network(expert_bundle, reg, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MOEMERGE_HUB_RETRIES", "0")
    with pytest.raises(HubError, match="cannot reach the Hub.*HF_HUB_OFFLINE"):
        pull(REPO, reg, endpoint="http://127.0.0.1:9", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        pull(REPO, reg, endpoint="http://127.0.0.1:9", token=TOKEN)


def test_concurrent_pulls_leave_one_entry(hub_env_lfs, expert_bundle, reg):
    _push(hub_env_lfs, expert_bundle[0])
    results, errors = [], []

    def work():
        try:
            results.append(_pull(hub_env_lfs, REPO, Registry(reg.home)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg.find()) == 1 and {r.entry.digest for r in results} == {reg.find()[0].digest}
    assert leftover_staging(reg.store) == []


def test_subfolder_push_is_idempotent_and_drops_stale_files(hub_env_lfs, expert_bundle, tmp_path, reg):
    from mergekit_moe.bundle import read_bundle, write_bundle

    srv = hub_env_lfs.server
    with_notes = tmp_path / "with-notes"
    notes = tmp_path / "notes.txt"
    notes.write_text("trained on synthetic notes\n")

    meta = read_bundle(expert_bundle[0]).meta
    write_bundle(with_notes, expert_bundle[1], meta, extra_files={"notes.txt": notes})
    a = _push(hub_env_lfs, with_notes, subfolder="experts/dx", private=True)
    files = srv.repo(REPO).head().files
    assert "experts/dx/notes.txt" in files and "README.md" in files  # root card so search finds the repo
    assert srv.repo(REPO).private
    assert "local:" not in files["experts/dx/expert.json"].data.decode()  # no local provenance leaks
    b = _push(hub_env_lfs, with_notes, subfolder="experts/dx")
    assert not b.changed and b.commit == a.commit
    c = _push(hub_env_lfs, expert_bundle[0], subfolder="experts/dx")
    assert c.changed and "experts/dx/notes.txt" not in srv.repo(REPO).head().files
    got = _pull(hub_env_lfs, f"{REPO}:experts/dx", reg)
    assert got.verified and "notes.txt" not in got.entry.provenance["files"]


def test_push_composed_checkpoint(hub_env_lfs, expert_bundle, tiny_base, tmp_path, reg):
    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.checkpoint import save_checkpoint
    from mergekit_moe.errors import BundleError
    from mergekit_moe.lora import read_adapter
    from mergekit_moe.moe.spec import MoeSpec

    spec = MoeSpec.from_experts(str(tiny_base), fingerprint_of(tiny_base), {"dx": read_adapter(expert_bundle[1])},
                                hidden_size=64, model_type="llama")
    ck = save_checkpoint(spec, tmp_path / "ck", recipe_text="name: demo\n")
    res = _push(hub_env_lfs, ck, repo="medorg/moe")
    assert res.kind == "checkpoint" and res.changed
    files = hub_env_lfs.server.repo("medorg/moe").head().files
    assert files["moe_lora.safetensors"].data == (ck / "moe_lora.safetensors").read_bytes()
    assert not _push(hub_env_lfs, ck, repo="medorg/moe").changed
    with pytest.raises(BundleError, match="composed checkpoint"):
        _pull(hub_env_lfs, "medorg/moe", reg)
    (ck / "recipe.yaml").write_text("name: tampered\n")
    hub_env_lfs.server.requests.clear()
    with pytest.raises(IntegrityError):
        _push(hub_env_lfs, ck, repo="medorg/moe")
    assert hub_env_lfs.server.requests == []


def test_base_fingerprint_checked_when_base_given(hub_env_lfs, expert_bundle, tiny_base, tiny_base_factory, reg):
    from mergekit_moe.errors import BaseMismatchError

    _push(hub_env_lfs, expert_bundle[0])
    other = tiny_base_factory("llama", layers=2)
    with pytest.raises(BaseMismatchError, match="--base"):
        _pull(hub_env_lfs, REPO, reg, base=str(other))
    _assert_nothing_left(reg)
    assert _pull(hub_env_lfs, REPO, reg, base=str(tiny_base)).verified


def test_lfs_downloads_redirected_to_another_origin(expert_bundle, reg, monkeypatch, tmp_path):
    """Like the Hub's CDN: LFS files answer 302 to another origin (and must not get the token)."""
    from huggingface_hub import constants
    from hub_server import HubServer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(upload_mode="lfs", redirect_lfs=True) as srv:
        res = push(expert_bundle[0], REPO, endpoint=srv.url, token=TOKEN, private=True)
        got = pull(REPO, reg, endpoint=srv.url, token=TOKEN)
        assert got.verified and got.commit == res.commit
        assert any(p.startswith("/lfs-objects/") and m == "GET" for m, p in srv.requests)
        srv.state.lfs_objects[srv.repo(REPO).head().files["adapter_model.safetensors"].sha256] = b"\0" * 16
        with pytest.raises(HubError, match="adapter_model.safetensors"):
            pull(f"{REPO}@{res.commit}", Registry(tmp_path / "r2"), endpoint=srv.url, token=TOKEN)

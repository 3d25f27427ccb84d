"""Tampered bundles, signatures and hostile paths against the registry and the Hub (issue 9, items 1, 2, 6, 14, 15).

Item 1 is checked for EVERY file of a bundle: one changed byte fails ``moemerge verify`` (exit 1, one
line naming the file) and ``pull`` (naming the file), and the registry (index, store, lock file) is
byte-for-byte what it was before, with no temp or staging files left.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN

from mergekit_moe.atomic import leftover_staging
from mergekit_moe.bundle import EXPERT_JSON, SIGNATURE, read_bundle
from mergekit_moe.errors import FormatError, IntegrityError, MoeMergeError, UnsafeFileError
from mergekit_moe.registry import Registry

BUNDLE_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", EXPERT_JSON]
REPO = "medorg/sec-dx"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes), directory and link under ``root``: what "byte-identical" compares."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(dirpath) / d
            out[str(p.relative_to(root)) + "/"] = "link" if p.is_symlink() else "dir"
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = f"link->{os.readlink(p)}" if p.is_symlink() else p.read_bytes()
    return out


def no_temp_files(root: Path) -> list[str]:
    """Staging / temp / aside leftovers anywhere under ``root``."""
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            if ".staging-" in n or ".tmp-" in n or ".old-" in n or n.endswith((".incomplete", ".lock.tmp")):
                bad.append(str(Path(dirpath, n).relative_to(root)))
    return bad


def flip_one_byte(path: Path, where: str = "middle") -> None:
    """Change exactly one byte. JSON files keep parsing (a letter inside a string changes case), so the
    check that fires is the hash, not the JSON parser."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        text = data.decode()
        i = text.index('"', text.index(":") + 1) + 1  # first character of the first string value
        while not text[i].isalpha():
            i += 1
        data[i] = ord(text[i].swapcase())
    else:
        i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def populated(expert_bundle, tiny_base, tmp_path):
    """A registry holding the expert plus a second one, so "unchanged" covers a non-trivial index."""
    from helpers import make_peft_adapter

    reg = Registry()
    entry = reg.add(expert_bundle[0])
    other = make_peft_adapter(tiny_base, tmp_path / "other-ad", seed=21)
    reg.import_adapter(other, name="other", task="t", base=str(tiny_base))
    return reg, entry


# ------------------------------------------------------------------------------------ item 1: verify

@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_one_changed_byte_in_any_file_fails_cli_verify_and_changes_nothing(populated, rel):
    from helpers import run_cli

    reg, entry = populated
    flip_one_byte(entry.path / rel)
    before = snapshot(reg.home)
    p = run_cli("verify", "dx")
    assert p.returncode == 1, p.stdout
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    assert rel in err
    if rel == EXPERT_JSON:
        assert "digest does not match" in err
    else:
        assert "sha256" in err or "size" in err
    assert snapshot(reg.home) == before
    assert no_temp_files(reg.home) == []
    assert run_cli("verify", "other").returncode == 0  # the other entry is untouched and still verifies


@pytest.mark.parametrize("rel", ["adapter_config.json", "adapter_model.safetensors", "README.md"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_any_position_any_file_fails_verify(populated, rel, where):
    reg, entry = populated
    if rel.endswith(".json"):
        data = bytearray((entry.path / rel).read_bytes())
        i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
        data[i] ^= 0x20
        (entry.path / rel).write_bytes(bytes(data))
    else:
        flip_one_byte(entry.path / rel, where)
    before = snapshot(reg.home)
    with pytest.raises(IntegrityError, match=rf"{rel}.*(sha256|size)"):
        reg.verify("dx")
    assert snapshot(reg.home) == before


def test_tampered_bundle_cannot_be_reimported_or_exported(populated, tmp_path):
    """A changed store copy is not laundered: export and add from it both refuse."""
    from helpers import run_cli

    reg, entry = populated
    flip_one_byte(entry.path / "adapter_model.safetensors")
    before = snapshot(reg.home)
    p = run_cli("export", "dx", tmp_path / "out")
    assert p.returncode == 1 and "adapter_model.safetensors" in p.stderr
    assert not (tmp_path / "out").exists() and leftover_staging(tmp_path) == []
    with pytest.raises(IntegrityError):
        reg.add(entry.path, name="laundered")
    assert snapshot(reg.home) == before


# -------------------------------------------------------------------------------------- item 1: pull

@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_one_changed_byte_served_by_the_hub_fails_pull_and_changes_nothing(hub_env_lfs, expert_bundle, populated, rel):
    from mergekit_moe.hub import pull, push

    reg, _entry = populated
    push(expert_bundle[0], REPO, endpoint=hub_env_lfs.url, token=TOKEN)
    hub_env_lfs.server.tamper(REPO, rel)  # same length, one byte flipped, on every GET
    before = snapshot(reg.home)
    with pytest.raises(IntegrityError) as ei:
        pull(REPO, reg, endpoint=hub_env_lfs.url, token=TOKEN, name="dx-pulled")
    assert rel in str(ei.value) and "\n" not in str(ei.value)
    assert snapshot(reg.home) == before
    assert no_temp_files(reg.home) == []


def test_cli_pull_of_tampered_file_exits_1_and_changes_nothing(hub_env_lfs, expert_bundle, populated):
    from mergekit_moe.hub import push

    reg, _entry = populated
    push(expert_bundle[0], REPO, endpoint=hub_env_lfs.url, token=TOKEN)
    hub_env_lfs.server.tamper(REPO, "adapter_model.safetensors")
    before = snapshot(reg.home)
    p = hub_env_lfs.run("pull", REPO, "--name", "dx-pulled", env={"MOEMERGE_HOME": str(reg.home)})
    assert p.returncode == 1, p.stdout
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "adapter_model.safetensors" in errs[0] and "Traceback" not in p.stderr
    assert snapshot(reg.home) == before and no_temp_files(reg.home) == []


# -------------------------------------------------------------------------------------- item 2: signing

def _keypair(tmp_path: Path, name: str, kind: str = "ec") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = ec.generate_private_key(ec.SECP384R1() if kind == "p384" else ec.SECP256R1()) if kind != "ed25519" \
        else ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _main(capsys, *args) -> tuple[int, str, str]:
    """``moemerge ARGS`` in-process through the real entry point (error mapping and exit codes included)."""
    from mergekit_moe.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _resign_metadata(path: Path) -> None:
    """What an attacker with write access but no key does: change metadata, recompute the digest."""
    from mergekit_moe.bundle import _expert_json

    b = read_bundle(path)
    b.meta.description = "totally the same expert"
    (path / EXPERT_JSON).write_text(json.dumps(_expert_json(b.meta, b.files)))


SIGN_CASES = {
    "modified-file": (lambda p: flip_one_byte(p / "adapter_model.safetensors"), r"adapter_model\.safetensors does not match its sha256"),
    "truncated-file": (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:-1]),
                       r"adapter_model\.safetensors has size"),
    "missing-file": (lambda p: (p / "README.md").unlink(), r"README\.md is missing"),
    "extra-file": (lambda p: (p / "hook.py").write_text("import os\n"), r"hook\.py is not listed in the manifest"),
    "extra-file-in-subdir": (lambda p: (p / "sub").mkdir() or (p / "sub" / "x.json").write_text("{}"), r"sub/x\.json is not listed"),
    "metadata-changed-and-redigested": (_resign_metadata, r"signature is for another bundle digest"),
    "signature-removed": (lambda p: (p / SIGNATURE).unlink(), r"not signed"),
    "signature-bytes-altered": (lambda p: _alter_sig(p), r"does not verify.*altered"),
    "signature-not-json": (lambda p: (p / SIGNATURE).write_text("{" * 50_000), r"signature is not valid JSON"),
}


def _alter_sig(p: Path) -> None:
    import base64

    doc = json.loads((p / SIGNATURE).read_text())
    raw = bytearray(base64.b64decode(doc["signature"]))
    raw[len(raw) // 2] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(raw)).decode()
    (p / SIGNATURE).write_text(json.dumps(doc))


@pytest.fixture
def signed(expert_bundle, tmp_path):
    priv, pub = _keypair(tmp_path, "alice")
    bdir = tmp_path / "bundle"
    shutil.copytree(expert_bundle[0], bdir)
    from mergekit_moe.signing import sign_bundle

    sign_bundle(read_bundle(bdir), priv)
    return bdir, priv, pub


@pytest.mark.parametrize("case", sorted(SIGN_CASES))
def test_signed_bundle_tampering_fails_verify_key_with_a_specific_message(signed, capsys, case):
    bdir, _priv, pub = signed
    code, out, _err = _main(capsys, "verify", bdir, "--key", pub)
    assert code == 0 and "signature verified" in out
    mutate, rx = SIGN_CASES[case]
    mutate(bdir)
    code, out, err = _main(capsys, "verify", bdir, "--key", pub)
    assert code == 1 and "signature verified" not in out
    line = " ".join(err.split())
    assert err.strip().startswith("error:") and __import__("re").search(rx, line), err


@pytest.mark.parametrize("kind", ["ec", "p384", "ed25519"])
def test_wrong_key_and_wrong_key_type_fail_specifically(signed, tmp_path, capsys, kind):
    bdir, priv, _pub = signed
    _other_priv, other_pub = _keypair(tmp_path, f"mallory-{kind}", kind)
    code, _out, err = _main(capsys, "verify", bdir, "--key", other_pub)
    assert code == 1 and "does not verify with this public key" in err and "another key" in err
    code, _out, err = _main(capsys, "verify", bdir, "--key", priv)  # a private key where a public one belongs
    assert code == 1 and "not a PEM public key" in err
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    code, _out, err = _main(capsys, "verify", bdir, "--key", junk)
    assert code == 1 and "not a PEM public key" in err


def test_rsa_keys_are_refused_for_signing(expert_bundle, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    bdir = tmp_path / "b"
    shutil.copytree(expert_bundle[0], bdir)
    code, _out, err = _main(capsys, "sign", bdir, "--key", tmp_path / "rsa.pem")
    assert code != 0 and "unsupported key type" in err and not (bdir / SIGNATURE).exists()


def test_signing_refuses_a_bundle_that_does_not_verify(expert_bundle, tmp_path, capsys):
    priv, _pub = _keypair(tmp_path, "alice")
    bdir = tmp_path / "b"
    shutil.copytree(expert_bundle[0], bdir)
    flip_one_byte(bdir / "adapter_model.safetensors")
    code, _out, err = _main(capsys, "sign", bdir, "--key", priv)
    assert code == 1 and "adapter_model.safetensors" in err and not (bdir / SIGNATURE).exists()


def test_cli_sign_and_verify_registry_entry_subprocess(populated, tmp_path):
    """The issue's exact commands, as a user types them: sign NAME --key KEY.pem / verify NAME --key PUB.pem."""
    from helpers import run_cli

    reg, entry = populated
    priv, pub = _keypair(tmp_path, "alice")
    _p2, other_pub = _keypair(tmp_path, "bob")
    assert run_cli("sign", "dx", "--key", priv).returncode == 0
    ok = run_cli("verify", "dx", "--key", pub)
    assert ok.returncode == 0 and "signature verified" in ok.stdout
    bad = run_cli("verify", "dx", "--key", other_pub)
    assert bad.returncode == 1 and "another key" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    flip_one_byte(entry.path / "adapter_model.safetensors")
    bad = run_cli("verify", "dx", "--key", pub)
    assert bad.returncode == 1 and "adapter_model.safetensors" in bad.stderr


# ------------------------------------------------------------------------------------- item 6: paths

def _rewrite(bdir: Path, mutate) -> None:
    d = json.loads((bdir / EXPERT_JSON).read_text())
    mutate(d)
    d.pop("digest", None)
    (bdir / EXPERT_JSON).write_text(json.dumps(d))


@pytest.mark.parametrize("bad", ["../escape.txt", "../../escape.txt", "/tmp/escape.txt", "sub/../../escape.txt",
                                 "sub\\..\\..\\escape.txt", "C:/escape.txt", "./escape.txt", "sub//escape.txt",
                                 "escape.txt\x00.json", ""])
def test_manifest_paths_that_escape_are_refused_by_add_and_nothing_is_written(expert_bundle, tmp_path, bad):
    bdir = tmp_path / "work" / "bundle"
    shutil.copytree(expert_bundle[0], bdir)
    _rewrite(bdir, lambda d: d["files"].__setitem__(bad, {"sha256": "0" * 64, "size": 1}))
    reg = Registry()
    before_tmp = snapshot(tmp_path)
    with pytest.raises(UnsafeFileError):
        reg.add(bdir)
    assert snapshot(tmp_path) == before_tmp  # nothing written anywhere under tmp (registry home included)
    assert reg.find() == []


def test_symlinks_in_a_bundle_are_refused(expert_bundle, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE")
    reg = Registry()
    # a symlinked directory
    b1 = tmp_path / "b1"
    shutil.copytree(expert_bundle[0], b1)
    os.symlink(secret, b1 / "extra")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        reg.add(b1)
    # a manifest entry that goes through a symlinked directory
    b2 = tmp_path / "b2"
    shutil.copytree(expert_bundle[0], b2)
    os.symlink(secret, b2 / "extra")
    from mergekit_moe.hashing import sha256_file

    _rewrite(b2, lambda d: d["files"].__setitem__("extra/id_rsa", {"sha256": sha256_file(secret / "id_rsa"), "size": 7}))
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        reg.add(b2)
    # expert.json itself a symlink
    b3 = tmp_path / "b3"
    shutil.copytree(expert_bundle[0], b3)
    real = tmp_path / "real-expert.json"
    shutil.move(b3 / EXPERT_JSON, real)
    os.symlink(real, b3 / EXPERT_JSON)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        reg.add(b3)
    assert reg.find() == []
    assert not reg.store.exists() or not list(reg.store.rglob("id_rsa"))


def test_symlinked_lock_file_is_refused(tmp_path):
    from mergekit_moe.lockfile import LockFile

    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"format_version": 1, "experts": {}}))
    link = tmp_path / "recipe.lock.json"
    os.symlink(target, link)
    with pytest.raises(FormatError, match="not a regular file"):
        LockFile.load(link)


# -------------------------------------------------------------------------------- item 15: model cards

def test_hostile_card_on_a_plain_repo_changes_no_behaviour(hub_env_lfs, expert_bundle, tmp_path):
    """A card that claims another base, remote code, a pickle and a huge tag list: none of it is used."""
    from mergekit_moe.hub import pull

    card = ("---\nlibrary_name: transformers\nbase_model: evil/model\ntrust_remote_code: true\n"
            "auto_map: {AutoModel: evil.Model}\nname: ../../escape\nversion: '../x'\n"
            "tags: ['task:../../escape', " + ", ".join(f"t{i}" for i in range(5000)) + "]\n---\n# hi\n").encode()
    cfg = json.loads((expert_bundle[1] / "adapter_config.json").read_text())
    hub_env_lfs.server.put_files("medorg/plain-sec", {
        "adapter_config.json": json.dumps(cfg).encode(),
        "adapter_model.safetensors": (expert_bundle[1] / "adapter_model.safetensors").read_bytes(),
        "README.md": card})
    reg = Registry(tmp_path / "reg")
    try:
        got = pull("medorg/plain-sec", reg, endpoint=hub_env_lfs.url, token=TOKEN)
    except MoeMergeError as exc:  # refusing the whole pull is also acceptable, but it must be our error
        assert "\n" not in str(exc)
        assert reg.find() == []
        return
    e = got.entry
    assert e.name == "plain-sec" and e.version == "1" and e.path.parent == reg.store
    assert e.base_model == cfg["base_model_name_or_path"]  # from the adapter config, never from the card
    assert len(e.tags) <= 32 and not got.verified
    assert e.task == "../../escape"  # a task from a tag is only a label: stored as text, never used as a path
    assert not (tmp_path / "escape").exists() and not (reg.home.parent / "escape").exists()
    reg.verify(e.ref)

"""Expert bundles: PEFT-loadable layout, expert.json manifest, verify, unsafe paths, hostile model cards."""

import json
import os

import pytest
import torch
from helpers import make_peft_adapter

from mergekit_moe.atomic import leftover_staging
from mergekit_moe.bundle import EXPERT_JSON, ExpertMeta, read_bundle, write_bundle
from mergekit_moe.errors import BundleError, FormatError, IntegrityError, UnsafeFileError
from mergekit_moe.modelcard import MAX_FRONT_MATTER_BYTES, split_card


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("ad") / "a", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])


def _meta(**kw):
    d = dict(name="diag", task="diagnosis", base_model="HuggingFaceTB/SmolLM2-135M", base_fingerprint="ab" * 32,
             tags=["medical"], metrics={"exact_match": 0.75}, hyperparameters={"lr": 2e-4})
    d.update(kw)
    return ExpertMeta(**d)


def _logits(base_dir, adapter, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_bundle_is_a_peft_adapter_with_manifest_and_card(tiny_base, adapter_dir, tmp_path):
    loss_png = tmp_path / "loss.png"
    loss_png.write_bytes(b"\x89PNG fake but hashed")
    b = write_bundle(tmp_path / "b", adapter_dir, _meta(), extra_files={"plots/loss_curve.png": loss_png})
    names = {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md", EXPERT_JSON, "plots/loss_curve.png"}
    d = json.loads((b.path / EXPERT_JSON).read_text())
    assert d["format_version"] == 1 and d["name"] == "diag" and d["task"] == "diagnosis" and d["created_at"]
    assert set(d["files"]) == names - {EXPERT_JSON}
    assert d["files"]["adapter_model.safetensors"]["size"] == (b.path / "adapter_model.safetensors").stat().st_size
    assert d["digest"] == b.digest
    # PEFT loads the bundle directory unchanged and computes the same function as the source adapter
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    torch.testing.assert_close(_logits(tiny_base, b.path, ids), _logits(tiny_base, adapter_dir, ids), rtol=0, atol=0)
    fm, body = split_card((b.path / "README.md").read_text())
    assert fm["library_name"] == "peft" and fm["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"moemerge", "lora", "medical"} <= set(fm["tags"])
    assert "exact_match" in body
    rb = read_bundle(b.path)
    rb.verify()
    assert rb.digest == b.digest and rb.meta.metrics == {"exact_match": 0.75}
    assert set(rb.adapter().factors) == set(b.adapter().factors) and len(rb.adapter().factors) == 12


def test_local_base_path_stays_out_of_hub_front_matter(adapter_dir, tmp_path):
    b = write_bundle(tmp_path / "b", adapter_dir, _meta(base_model=str(tmp_path / "some-base")))
    fm, _ = split_card((b.path / "README.md").read_text())
    assert "base_model" not in fm  # the Hub rejects non-repo-id base_model values
    assert read_bundle(b.path).meta.base_model == str(tmp_path / "some-base")


def test_digest_ignores_creation_time_but_not_content(adapter_dir, tmp_path):
    a = write_bundle(tmp_path / "a", adapter_dir, _meta(created_at="2020-01-01T00:00:00+00:00"))
    b = write_bundle(tmp_path / "b", adapter_dir, _meta(created_at="2024-06-01T00:00:00+00:00", provenance={"source": "x"}))
    c = write_bundle(tmp_path / "c", adapter_dir, _meta(metrics={"exact_match": 0.5}))
    assert a.digest == b.digest != c.digest


def test_verify_names_modified_missing_and_extra_files(adapter_dir, tmp_path):
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    w = b.path / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x01  # one bit in the tensor data: size unchanged, hash changes
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        read_bundle(b.path).verify()
    b2 = write_bundle(tmp_path / "b2", adapter_dir, _meta())
    (b2.path / "README.md").unlink()
    with pytest.raises(IntegrityError, match="README.md is missing"):
        read_bundle(b2.path).verify()
    b3 = write_bundle(tmp_path / "b3", adapter_dir, _meta())
    (b3.path / "evil.py").write_text("import os")
    with pytest.raises(IntegrityError, match="evil.py"):
        read_bundle(b3.path).verify()


def _rewrite_manifest(path, mutate):
    d = json.loads((path / EXPERT_JSON).read_text())
    mutate(d)
    d.pop("digest", None)
    (path / EXPERT_JSON).write_text(json.dumps(d))


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "a/../../x", "C:\\x", "sub/./x"])
def test_unsafe_manifest_paths_are_refused(adapter_dir, tmp_path, bad):
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    _rewrite_manifest(b.path, lambda d: d["files"].__setitem__(bad, {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(UnsafeFileError):
        read_bundle(b.path)


def test_symlinked_file_is_refused(adapter_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    (b.path / "README.md").unlink()
    os.symlink(secret, b.path / "README.md")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        read_bundle(b.path).verify()


def test_bad_expert_json(adapter_dir, tmp_path):
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    _rewrite_manifest(b.path, lambda d: d.__setitem__("format_version", 99))
    with pytest.raises(FormatError, match="format_version 99"):
        read_bundle(b.path)
    b2 = write_bundle(tmp_path / "b2", adapter_dir, _meta())
    d = json.loads((b2.path / EXPERT_JSON).read_text())
    d["task"] = "something-else"  # hand edit without updating the digest
    (b2.path / EXPERT_JSON).write_text(json.dumps(d))
    with pytest.raises(IntegrityError, match="digest"):
        read_bundle(b2.path)
    (b2.path / EXPERT_JSON).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_bundle(b2.path)
    with pytest.raises(BundleError, match="no expert.json"):
        read_bundle(adapter_dir)


def test_failed_write_leaves_nothing(adapter_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "out", adapter_dir, _meta(), extra_files={"x.png": tmp_path / "missing.png"})
    assert not (tmp_path / "out").exists() and leftover_staging(tmp_path) == []
    with pytest.raises(UnsafeFileError):
        write_bundle(tmp_path / "out", adapter_dir, _meta(), extra_files={"../x.png": adapter_dir / "adapter_config.json"})
    assert not (tmp_path / "out").exists() and leftover_staging(tmp_path) == []


def test_export_writes_plain_peft_dir(tiny_base, adapter_dir, tmp_path):
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    out = b.export(tmp_path / "plain")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()


def test_hostile_front_matter_is_bounded():
    laughs = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n---\nbody"
    with pytest.raises(FormatError, match="alias|anchor"):
        split_card(laughs)
    with pytest.raises(FormatError, match="larger than"):
        split_card("---\nx: '" + "y" * (MAX_FRONT_MATTER_BYTES + 10) + "'\n---\n")
    with pytest.raises(FormatError, match="not valid YAML"):
        split_card("---\nx: !!python/object/apply:os.system ['touch /tmp/pwned']\n---\n")
    with pytest.raises(FormatError, match="deeper"):
        split_card("---\nx: " + "[" * 40 + "]" * 40 + "\n---\n")
    with pytest.raises(FormatError, match="never ends"):
        split_card("---\nx: 1\nno end")
    with pytest.raises(FormatError, match="mapping"):
        split_card("---\n- a\n- b\n---\n")
    assert split_card("no front matter") == ({}, "no front matter")
    fm, body = split_card("---\nlibrary_name: peft\ntags: [a]\n---\n# Title\n")
    assert fm == {"library_name": "peft", "tags": ["a"]} and body == "# Title\n"


def _keypair(tmp_path, name="k", kind="ec"):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.mark.parametrize("kind", ["ec", "ed25519"])
def test_sign_and_verify_signature(adapter_dir, tmp_path, kind):
    from mergekit_moe.registry import Registry
    from mergekit_moe.signing import sign_bundle, verify_signature

    priv, pub = _keypair(tmp_path, kind=kind)
    _other_priv, other_pub = _keypair(tmp_path, "other", kind=kind)
    b = write_bundle(tmp_path / "b", adapter_dir, _meta())
    with pytest.raises(IntegrityError, match="not signed"):
        verify_signature(read_bundle(b.path), pub)
    sign_bundle(read_bundle(b.path), priv)
    read_bundle(b.path).verify()  # expert.sig is not an "extra file"
    assert verify_signature(read_bundle(b.path), pub)["digest"] == b.digest
    with pytest.raises(IntegrityError, match="another key"):
        verify_signature(read_bundle(b.path), other_pub)
    # the signature survives registration (same digest) and still verifies from the store
    e = Registry().add(b.path)
    assert verify_signature(Registry().bundle("diag"), pub)["digest"] == e.digest
    # changing metadata changes the digest: the old signature no longer applies
    d = json.loads((b.path / EXPERT_JSON).read_text())
    d["metrics"] = {"exact_match": 0.99}
    d.pop("digest")
    (b.path / EXPERT_JSON).write_text(json.dumps(d))
    with pytest.raises(IntegrityError, match="another bundle digest"):
        verify_signature(read_bundle(b.path), pub)
    # a tampered signature value is refused
    b2 = write_bundle(tmp_path / "b2", adapter_dir, _meta())
    sig = sign_bundle(read_bundle(b2.path), priv)
    doc = json.loads(sig.read_text())
    raw = bytearray(__import__("base64").b64decode(doc["signature"]))
    raw[-1] ^= 1
    doc["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_signature(read_bundle(b2.path), pub)


def test_accepted_manifest_paths_never_escape(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mergekit_moe.bundle import check_relpath

    root = (tmp_path / "root").resolve()

    @settings(max_examples=400, deadline=None)
    @given(st.text(alphabet="a./\\:~ \x00", max_size=12))
    def prop(rel):
        try:
            check_relpath(rel, where="x")
        except UnsafeFileError:
            return
        resolved = (root / rel).resolve()
        assert resolved != root and root in resolved.parents

    prop()

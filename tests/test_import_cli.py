"""`moemerge import/list/info/verify/export/remove` as a user runs them (subprocess), with real PEFT adapters."""

import os

import pytest
import torch
from helpers import make_peft_adapter, run_cli

from mergekit_moe.registry import Registry


def _cli(*args):
    """In-process run (fast) for output-formatting checks; error paths and key flows use real subprocesses."""
    from click.testing import CliRunner

    from mergekit_moe.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _import(adapter, base, **kw):
    return Registry().import_adapter(adapter, name=kw.pop("name", "diag"), task=kw.pop("task", "diagnosis"), base=str(base), **kw)


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("cli") / "lora", r=4, alpha=16, targets=["q_proj", "v_proj", "up_proj"])


def _logits(base_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_import_export_roundtrip_identical_logits(tiny_base, adapter, tmp_path):
    p = run_cli("import", adapter, "--name", "diag", "--task", "diagnosis", "--base", tiny_base, "--tag", "medical",
                "--description", "Toy diagnosis expert", check=True)
    assert "diag@1" in p.stdout and "sha256:" in p.stdout
    run_cli("export", "diag", tmp_path / "out", check=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.tensor([[7, 1, 200, 33, 5, 18, 99]])
    torch.testing.assert_close(_logits(tiny_base, tmp_path / "out", ids), _logits(tiny_base, adapter, ids), rtol=0, atol=0)
    # the stored bundle itself loads in PEFT too
    e = Registry().resolve("diag")
    torch.testing.assert_close(_logits(tiny_base, e.path, ids), _logits(tiny_base, adapter, ids), rtol=0, atol=0)
    # re-importing the same adapter is idempotent
    assert _import(adapter, tiny_base).ref == "diag@1" and len(Registry().find()) == 1
    # exporting onto an existing dir needs --overwrite
    p = run_cli("export", "diag", tmp_path / "out")
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_list_info_are_readable(tiny_base, adapter):
    p = run_cli("list", check=True)
    assert "no experts yet" in p.stdout and "moemerge import" in p.stdout
    _import(adapter, tiny_base, tags=["medical"], metrics={"exact_match": 0.5})
    p = run_cli("list", check=True)
    for word in ("name", "task", "digest", "diag", "diagnosis", "medical", "unverified"):
        assert word in p.stdout
    assert "no experts match" in _cli("list", "--task", "summarization")
    assert "diag" in _cli("list", "--base", tiny_base) and "diag" in _cli("list", "--tag", "medical")
    assert "no experts match" in _cli("list", "--base", "0" * 64)
    out = _cli("info", "diag")
    for word in ("Expert", "Adapter", "Files", "adapter_model.safetensors", "Provenance", "unverified", "Hyperparameters",
                 "q_proj", "Metrics", "exact_match"):
        assert word in out, word
    sha = Registry().resolve("diag").digest
    assert "sha256:" + sha[:20] in out.replace("\n", "").replace(" ", "")
    assert "import" in _cli("--help") and "--convert-pickle" in _cli("import", "--help")


def test_verify_flipped_byte_exits_1_naming_the_file(tiny_base, adapter):
    _import(adapter, tiny_base)
    assert "files match expert.json" in run_cli("verify", "diag", check=True).stdout
    e = Registry().resolve("diag")
    w = e.path / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    for ref in ("diag", str(e.path)):
        p = run_cli("verify", ref)
        assert p.returncode == 1 and "adapter_model.safetensors" in p.stderr and "sha256" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_shape_mismatch_is_refused_naming_the_tensor(tiny_base_factory, adapter):
    wide = tiny_base_factory("llama", hidden=128)
    p = run_cli("import", adapter, "--name", "diag", "--task", "diagnosis", "--base", wide)
    assert p.returncode == 1
    assert "lora_A.weight" in p.stderr and "base_model.model.model.layers." in p.stderr and "Traceback" not in p.stderr
    assert Registry().find() == []


def test_pickle_adapter_refused_then_converted_on_request(tiny_base, adapter, tmp_path):
    from safetensors.torch import load_file

    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    torch.save(load_file(adapter / "adapter_model.safetensors"), pk / "adapter_model.bin")
    p = run_cli("import", pk, "--name", "diag", "--task", "diagnosis", "--base", tiny_base)
    assert p.returncode == 1 and "pickle" in p.stderr and "--convert-pickle" in p.stderr
    assert Registry().find() == []
    run_cli("import", pk, "--name", "diag", "--task", "diagnosis", "--base", tiny_base, "--convert-pickle", check=True)
    e = Registry().resolve("diag")
    ids = torch.tensor([[11, 12, 13, 14]])
    torch.testing.assert_close(_logits(tiny_base, e.path, ids), _logits(tiny_base, adapter, ids), rtol=0, atol=0)


def test_remove_and_unknown_names(tiny_base, adapter):
    p = run_cli("info", "nope")
    assert p.returncode == 1 and "no expert named 'nope'" in p.stderr and "moemerge import" in p.stderr
    p = run_cli("import", adapter)
    assert p.returncode == 1 and "--name and --task" in p.stderr
    _import(adapter, tiny_base)
    p = run_cli("remove", "diag", check=True)
    assert "removed diag@1" in p.stdout
    assert Registry().find() == []
    (Registry().store / ".deadbeef.staging-x").mkdir()  # what a killed import leaves behind
    assert "removed 1 leftover" in _cli("gc") and "nothing to clean" in _cli("gc")


def test_sign_and_verify_with_key(tiny_base, adapter, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    _import(adapter, tiny_base)
    p = run_cli("verify", "diag", "--key", tmp_path / "pub.pem")
    assert p.returncode == 1 and "not signed" in p.stderr
    assert "signed diag@1" in run_cli("sign", "diag", "--key", tmp_path / "key.pem", check=True).stdout
    assert "signature verified" in run_cli("verify", "diag", "--key", tmp_path / "pub.pem", check=True).stdout
    assert "ecdsa-sha256" in _cli("info", "diag")
    p = run_cli("sign", "diag", "--key", tmp_path / "pub.pem")  # a public key cannot sign
    assert p.returncode == 1 and "not a PEM private key" in p.stderr


def test_two_concurrent_cli_imports_leave_one_entry(tiny_base, adapter):
    import subprocess
    import sys

    args = [sys.executable, "-m", "mergekit_moe", "import", str(adapter), "--name", "diag", "--task", "diagnosis", "--base", str(tiny_base)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("diag@1" in out for out, _ in outs)
    entries = Registry().find()
    assert [e.ref for e in entries] == ["diag@1"]
    assert [p.name for p in Registry().store.iterdir() if not p.name.startswith(".")] == [entries[0].digest]


def test_import_base_from_adapter_config_or_warn(tiny_base, adapter, tmp_path):
    import json
    import shutil

    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.errors import ModelLoadError
    from mergekit_moe.progress import NullReporter

    rep = NullReporter()
    # PEFT recorded the tiny base's path in adapter_config.json: it is used when --base is omitted
    e = Registry().import_adapter(adapter, name="a", task="t", reporter=rep)
    assert e.base_fingerprint == fingerprint_of(tiny_base) and rep.warnings == []
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "no-such-org/no-such-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    e2 = Registry().import_adapter(other, name="b", task="t", reporter=rep)
    assert e2.base_fingerprint == "" and e2.base_model == "no-such-org/no-such-model"
    assert any("not validated" in w for w in rep.warnings)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        Registry().import_adapter(other, name="c", task="t", base="no-such-org/no-such-model")
    assert [x.name for x in Registry().find()] == ["a", "b"]

"""Local registry: SQLite index + content-addressed store; names, versions, crashes and concurrent writers."""

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import make_peft_adapter

from mergekit_moe.bundle import ExpertMeta, write_bundle
from mergekit_moe.errors import IntegrityError, RegistryError
from mergekit_moe.registry import Registry, open_bundle


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("reg-ad")
    return [make_peft_adapter(tiny_base, root / f"a{i}", seed=i) for i in range(3)]


def _bundle(adapter, out, **kw):
    d = dict(name="diag", task="diagnosis", base_model="org/base", base_fingerprint="cd" * 32, tags=["medical"])
    d.update(kw)
    return write_bundle(out, adapter, ExpertMeta(**d)).path


def test_add_resolve_find_remove(adapters, tmp_path, moemerge_home):
    reg = Registry()
    assert reg.home == moemerge_home
    e1 = reg.add(_bundle(adapters[0], tmp_path / "b0"))
    assert (e1.name, e1.version, e1.task) == ("diag", "1", "diagnosis")
    assert e1.path == moemerge_home / "store" / e1.digest and (e1.path / "expert.json").is_file()
    # identical content: same entry, nothing new
    assert reg.add(_bundle(adapters[0], tmp_path / "b0-again")).digest == e1.digest
    # another adapter under the same name gets the next version
    e2 = reg.add(_bundle(adapters[1], tmp_path / "b1"))
    assert e2.version == "2" and e2.digest != e1.digest
    e3 = reg.add(_bundle(adapters[2], tmp_path / "b2", name="ddi", task="interaction", tags=["drugs"]))
    assert reg.resolve("diag").version == "2"  # latest
    assert reg.resolve("diag@1").digest == e1.digest
    assert reg.resolve(f"sha256:{e3.digest[:10]}").name == "ddi"
    assert [e.ref for e in reg.find()] == ["ddi@1", "diag@1", "diag@2"]
    assert [e.ref for e in reg.find(task="diagnosis")] == ["diag@1", "diag@2"]
    assert [e.ref for e in reg.find(tag="drugs")] == ["ddi@1"]
    assert [e.ref for e in reg.find(base_fingerprint="cd" * 32)] == ["ddi@1", "diag@1", "diag@2"]
    assert reg.bundle("diag@2").meta.version == "2"  # the stored card and expert.json carry the assigned version
    assert "| version | 2 |" in (e2.path / "README.md").read_text()
    reg.verify("diag@2")
    assert open_bundle("ddi").digest == e3.digest and open_bundle(tmp_path / "b0").meta.name == "diag"

    removed = reg.remove("diag@1")
    assert removed.digest == e1.digest and not e1.path.exists()
    with pytest.raises(RegistryError, match="no version '1'"):
        reg.resolve("diag@1")
    assert [e.ref for e in reg.find()] == ["ddi@1", "diag@2"]


def test_resolve_errors_have_hints(adapters, tmp_path):
    reg = Registry()
    with pytest.raises(RegistryError, match="registry is empty"):
        reg.resolve("diag")
    reg.add(_bundle(adapters[0], tmp_path / "b0"))
    with pytest.raises(RegistryError, match="did you mean diag"):
        reg.resolve("dia")
    with pytest.raises(RegistryError, match="at least 4 hex"):
        reg.resolve("sha256:xyz")
    with pytest.raises(RegistryError, match="no expert with digest"):
        reg.resolve("sha256:" + "0" * 12)


def test_explicit_version_and_name_override(adapters, tmp_path):
    reg = Registry()
    reg.add(_bundle(adapters[0], tmp_path / "b0"))
    with pytest.raises(RegistryError, match="already exists with different content"):
        reg.add(_bundle(adapters[1], tmp_path / "b1"), version="1")
    e = reg.add(_bundle(adapters[1], tmp_path / "b1x"), version="2025.1", name="diag-v2")
    assert e.ref == "diag-v2@2025.1" and reg.bundle("diag-v2").meta.name == "diag-v2"
    with pytest.raises(RegistryError, match="invalid expert name"):
        reg.add(_bundle(adapters[2], tmp_path / "b2"), name="bad@name")


def test_tampered_bundle_never_enters(adapters, tmp_path):
    b = _bundle(adapters[0], tmp_path / "b0")
    w = b / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    reg = Registry()
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        reg.add(b)
    assert reg.find() == [] and not (reg.store.exists() and any(reg.store.iterdir()))


def test_provenance_is_recorded_but_not_part_of_digest(adapters, tmp_path):
    reg = Registry()
    b = _bundle(adapters[0], tmp_path / "b0")
    e = reg.add(b, provenance={"source": "hf://org/diag", "commit": "a" * 40, "verified": True})
    assert e.provenance["source"] == "hf://org/diag"
    assert json.loads((e.path / "expert.json").read_text())["provenance"]["verified"] is True
    assert e.digest == open_bundle(b).digest


_CRASH = textwrap.dedent("""
    import os, shutil, sys
    from mergekit_moe import atomic
    from mergekit_moe.registry import Registry
    point = sys.argv[2]
    if point == "copy":  # die after the first file is copied into the staging dir
        real_copy = shutil.copyfile
        def copy(src, dst, **kw):
            real_copy(src, dst, **kw)
            os._exit(17)
        shutil.copyfile = copy
    elif point == "rename":  # die just before the staging dir is renamed into the store
        real_replace = os.replace
        def replace(src, dst):
            if ".staging-" in str(src):
                os._exit(17)
            return real_replace(src, dst)
        os.replace = replace
    elif point == "index":  # die after the rename, before the index row is inserted
        atomic._fsync_dir = lambda p: os._exit(17)
    Registry().add(sys.argv[1])
    print("no crash")
""")


@pytest.mark.parametrize("point", ["copy", "rename", "index"])
def test_crash_mid_import_leaves_registry_as_it_was(adapters, tmp_path, point):
    reg = Registry()
    first = reg.add(_bundle(adapters[0], tmp_path / "b0"))
    b1 = _bundle(adapters[1], tmp_path / "b1", name="ddi", task="interaction")
    script = tmp_path / "crash.py"
    script.write_text(_CRASH)
    proc = subprocess.run([sys.executable, str(script), str(b1), point], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr
    assert [e.ref for e in reg.find()] == ["diag@1"]
    with pytest.raises(RegistryError):
        reg.resolve("ddi")
    reg.verify("diag")
    junk = reg.gc()
    assert junk, "the crash should have left a staging dir or an orphan store dir for gc"
    assert sorted(p.name for p in reg.store.iterdir()) == [first.digest]
    # the next import of the same bundle works normally
    e = reg.add(b1)
    assert e.ref == "ddi@1"
    reg.verify("ddi")


_WRITER = textwrap.dedent("""
    import os, sys, time
    from mergekit_moe.registry import Registry
    go = sys.argv[2]
    while not os.path.exists(go):  # start barrier: both writers are fully imported before either writes
        time.sleep(0.01)
    e = Registry().add(sys.argv[1])
    print(e.ref, e.digest)
""")


def _race(tmp_path, bundles):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(script), str(b), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for b in bundles]
    time.sleep(0.5)
    go.write_text("go")
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [o.split() for o, _ in outs]


def test_concurrent_imports_of_same_bundle_leave_one_entry(adapters, tmp_path, moemerge_home):
    b = _bundle(adapters[0], tmp_path / "b0")
    results = _race(tmp_path, [b, b])
    assert results[0] == results[1] == ["diag@1", results[0][1]]
    reg = Registry()
    assert [e.ref for e in reg.find()] == ["diag@1"]
    with sqlite3.connect(moemerge_home / "index.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1
    assert [p.name for p in reg.store.iterdir() if not p.name.startswith(".")] == [results[0][1]]


def test_concurrent_imports_of_different_bundles_get_distinct_versions(adapters, tmp_path):
    results = _race(tmp_path, [_bundle(adapters[0], tmp_path / "b0"), _bundle(adapters[1], tmp_path / "b1")])
    assert sorted(r[0] for r in results) == ["diag@1", "diag@2"]
    reg = Registry()
    for e in reg.find():
        reg.verify(e.ref)

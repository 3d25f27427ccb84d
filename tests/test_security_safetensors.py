"""Crafted safetensors files (issue 9, items 4 and 9).

Each crafted kind (oversized header, header longer than the file, overlapping / out-of-bounds
offsets, gaps, trailing bytes, truncation, dtype/shape size mismatch, duplicate names, invalid
UTF-8 / JSON, absurd nesting, bad shapes, bad metadata) must give our one-line ``FormatError``
naming the file (and the tensor where there is one) quickly: no crash, no allocation bigger than
the file. Values and dtypes (NaN/Inf, integer or fp8 tensors in an adapter) are ``ValidationError``
naming the tensor. The same files inside an adapter directory fail ``read_adapter`` and
``moemerge import`` with one line and leave the registry empty.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import make_peft_adapter, run_cli
from safetensors.torch import save_file

from mergekit_moe.errors import FormatError, MoeMergeError, ValidationError
from mergekit_moe.lora import read_adapter
from mergekit_moe.safetensors_io import MAX_HEADER_BYTES, inspect_safetensors, load_safetensors

A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}


def craft(path: Path, header: dict | bytes | str, data: bytes = b"\0" * 36, *, length: int | None = None) -> Path:
    """Write ``<u64 header length><header bytes><data>``; ``length`` overrides the length field."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _dup_names() -> bytes:
    # json.dumps cannot write a duplicate key: splice the text by hand
    return ('{"a": ' + json.dumps(A) + ', "a": ' + json.dumps({**B, "data_offsets": [24, 36]}) + "}").encode()


# (id, header, data, length override, regex the one-line message must match, tensor named in it)
CASES = [
    ("empty-file", None, b"", None, "too short", None),
    ("header-length-2^63", {"a": A, "b": B}, b"\0" * 36, 2**63, "header length", None),
    ("header-length-past-eof", {"a": A, "b": B}, b"\0" * 36, 10_000, "header length", None),
    ("truncated-data", {"a": A, "b": B}, b"\0" * 30, None, r"offsets \[24, 36\] outside the data area of 30", "b"),
    ("out-of-bounds-offsets", {"a": A, "b": {**B, "data_offsets": [24, 1 << 40]}}, b"\0" * 36, None, "outside the data area", "b"),
    ("reversed-offsets", {"a": A, "b": {**B, "data_offsets": [36, 24]}}, b"\0" * 36, None, "outside the data area", "b"),
    ("negative-offset", {"a": {**A, "data_offsets": [-12, 12]}, "b": B}, b"\0" * 36, None, "outside the data area", "a"),
    ("overlapping-offsets", {"a": A, "b": {**B, "data_offsets": [12, 24]}}, b"\0" * 36, None, "overlaps|trailing", None),
    ("two-tensors-same-bytes", {"a": {**A, "shape": [3], "data_offsets": [0, 12]}, "b": {**B, "data_offsets": [0, 12]}},
     b"\0" * 12, None, "overlaps", None),
    ("gap-between-tensors", {"a": {**A, "shape": [2], "data_offsets": [0, 8]}, "b": B}, b"\0" * 36, None, "gap", "b"),
    ("trailing-bytes", {"a": A, "b": B}, b"\0" * 36 + b"EVIL", None, "4 trailing bytes", None),
    ("dtype-shape-mismatch", {"a": {**A, "dtype": "F64"}, "b": B}, b"\0" * 36, None, r"F64 \[2, 3\] needs 48 bytes", "a"),
    ("shape-product-overflow", {"a": {**A, "shape": [2**62, 2**62]}, "b": B}, b"\0" * 36, None, "needs", "a"),
    ("negative-dim", {"a": {**A, "shape": [-2, -3]}, "b": B}, b"\0" * 36, None, "bad shape", "a"),
    ("float-dim", {"a": {**A, "shape": [2.0, 3]}, "b": B}, b"\0" * 36, None, "bad shape", "a"),
    ("bool-dim", {"a": {**A, "shape": [True, 3]}, "b": B}, b"\0" * 36, None, "bad shape", "a"),
    ("unknown-dtype", {"a": {**A, "dtype": "OBJECT"}, "b": B}, b"\0" * 36, None, "unknown dtype", "a"),
    ("extra-entry-key", {"a": {**A, "pickle": "x"}, "b": B}, b"\0" * 36, None, "must have dtype", "a"),
    ("entry-not-object", {"a": [1, 2], "b": B}, b"\0" * 36, None, "must have dtype", "a"),
    ("duplicate-names", _dup_names(), b"\0" * 36, None, "duplicate tensor name 'a'", None),
    ("invalid-utf8", b'{"a\xff\xfe": 1}', b"", None, "not valid UTF-8 JSON", None),
    ("invalid-json", b'{"a": {"dtype": "F32",', b"", None, "not valid UTF-8 JSON", None),
    ("nan-literal-json", b'{"a": NaN}', b"", None, "must have dtype", "a"),
    ("deeply-nested-json", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"", None, "not valid UTF-8 JSON", None),
    ("header-not-object", b'[1, 2, 3]', b"", None, "not a JSON object", None),
    ("metadata-not-strings", {"__metadata__": {"format": {"x": 1}}, "a": A, "b": B}, b"\0" * 36, None, "__metadata__", None),
]


def _make(tmp_path: Path, case) -> Path:
    cid, header, data, length, _rx, _tensor = case
    p = tmp_path / f"{cid}.safetensors"
    if header is None:
        p.write_bytes(data)
        return p
    return craft(p, header, data, length=length)


def test_the_valid_reference_file_passes(tmp_path):
    """The builder writes what the real library writes: otherwise the crafted cases prove nothing."""
    p = craft(tmp_path / "ok.safetensors", {"a": A, "b": B}, struct.pack("<9f", *range(9)))
    infos, _ = inspect_safetensors(p)
    assert sorted(infos) == ["a", "b"]
    t = load_safetensors(p)
    assert t["a"].shape == (2, 3) and t["b"].tolist() == [6.0, 7.0, 8.0]
    real = tmp_path / "real.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, str(real))
    assert {k: (v.dtype, v.shape) for k, v in inspect_safetensors(real)[0].items()} == \
           {k: (v.dtype, v.shape) for k, v in infos.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_crafted_file_gives_one_line_format_error(tmp_path, case):
    cid, _h, _d, _l, rx, tensor = case
    p = _make(tmp_path, case)
    size = p.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=rx) as ei:
            load_safetensors(p)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg, msg  # one line, names the file
    if tensor is not None:
        assert f"[{tensor}]" in msg, msg  # ... and the tensor
    # never an allocation driven by what the header claims: bounded by the file's own size
    assert peak < 4 * size + (1 << 20), f"{cid}: peak {peak} bytes for a {size}-byte file"


def test_header_length_above_the_limit_is_refused_before_reading(tmp_path):
    """A sparse 120 MB file whose length field claims a 110 MB header: refused without reading it."""
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 10 * 2**20))
        fh.truncate(MAX_HEADER_BYTES + 20 * 2**20)  # sparse: no disk space used
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="100 MB limit"):
            inspect_safetensors(p)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("st") / "lora", r=4, targets=["q_proj", "v_proj"])


def _with_weights(adapter: Path, dst: Path, weights: Path) -> Path:
    dst.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", dst / "adapter_config.json")
    shutil.copyfile(weights, dst / "adapter_model.safetensors")
    return dst


def _tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def _first_b(tensors: dict) -> str:
    return sorted(k for k in tensors if "lora_B" in k)[0]


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_non_finite_values_name_the_tensor(adapter, tmp_path, kind):
    t = _tensors(adapter)
    key = _first_b(t)
    t[key][1, 2] = float(kind)
    save_file(t, str(tmp_path / "w.safetensors"))
    d = _with_weights(adapter, tmp_path / "ad", tmp_path / "w.safetensors")
    with pytest.raises(ValidationError, match="NaN or Inf") as ei:
        read_adapter(d)
    assert f"[{key}]" in str(ei.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_disallowed_dtypes_name_the_tensor(adapter, tmp_path, dtype):
    t = _tensors(adapter)
    key = _first_b(t)
    t[key] = t[key].to(dtype)
    save_file(t, str(tmp_path / "w.safetensors"))
    d = _with_weights(adapter, tmp_path / "ad", tmp_path / "w.safetensors")
    with pytest.raises(ValidationError, match="is not allowed here") as ei:
        read_adapter(d)
    assert f"[{key}]" in str(ei.value)


def test_half_precision_adapters_are_accepted(adapter, tmp_path):
    t = {k: v.to(torch.bfloat16) for k, v in _tensors(adapter).items()}
    save_file(t, str(tmp_path / "w.safetensors"))
    ad = read_adapter(_with_weights(adapter, tmp_path / "ad", tmp_path / "w.safetensors"))
    assert all(f.A.dtype == torch.float32 for f in ad.factors.values())


def test_tensor_that_is_not_lora_is_refused_by_name(adapter, tmp_path):
    t = _tensors(adapter)
    t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)  # modules_to_save-style full weight
    save_file(t, str(tmp_path / "w.safetensors"))
    with pytest.raises(MoeMergeError, match=r"\[base_model\.model\.lm_head\.weight\]"):
        read_adapter(_with_weights(adapter, tmp_path / "ad", tmp_path / "w.safetensors"))


def _crafted_weights(adapter: Path, tmp_path: Path, kind: str) -> Path:
    """The adapter's real weight file, then damaged the way ``kind`` says."""
    real = (adapter / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", real[:8])
    header = json.loads(real[8:8 + n])
    data = real[8 + n:]
    out = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        out.write_bytes(real[:-7])
    elif kind == "trailing":
        out.write_bytes(real + b"\0" * 16)
    elif kind == "overlap":
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
        craft(out, header, data)
    elif kind == "oversized-header":
        out.write_bytes(struct.pack("<Q", 2**62) + real[8:])
    elif kind == "bad-json":
        out.write_bytes(real[:8] + b"\xff" * n + data)
    return out


@pytest.mark.parametrize("kind", ["truncated", "trailing", "overlap", "oversized-header", "bad-json"])
def test_read_adapter_refuses_crafted_weights(adapter, tmp_path, kind):
    d = _with_weights(adapter, tmp_path / "ad", _crafted_weights(adapter, tmp_path, kind))
    with pytest.raises(FormatError) as ei:
        read_adapter(d)
    assert str(d / "adapter_model.safetensors") in str(ei.value)


@pytest.mark.slow
def test_cli_import_of_crafted_weights_is_one_line_and_registers_nothing(tiny_base, adapter, tmp_path):
    from mergekit_moe.registry import Registry

    d = _with_weights(adapter, tmp_path / "ad", _crafted_weights(adapter, tmp_path, "overlap"))
    p = run_cli("import", d, "--name", "x", "--task", "t", "--base", tiny_base)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "unexpected" not in err, err
    assert str(d / "adapter_model.safetensors") in err.replace("\n", "")  # the user's file, not a temp copy
    assert "overlaps" in err
    assert Registry().find() == []


def test_import_of_non_finite_weights_names_the_users_tensor_and_registers_nothing(tiny_base, adapter, tmp_path):
    from mergekit_moe.registry import Registry

    t = _tensors(adapter)
    key = _first_b(t)
    t[key][0, 0] = float("nan")
    save_file(t, str(tmp_path / "w.safetensors"))
    d = _with_weights(adapter, tmp_path / "ad", tmp_path / "w.safetensors")
    with pytest.raises(ValidationError, match="NaN or Inf") as ei:
        Registry().import_adapter(d, name="x", task="t", base=str(tiny_base))
    assert f"{d / 'adapter_model.safetensors'} [{key}]" in str(ei.value)
    assert Registry().find() == []

"""Safe safetensors reading: the header is checked by us before any tensor is materialised.

``safetensors`` itself is safe against code execution; we add cheap structural checks so a
crafted file (oversized header, overlapping or out-of-bounds offsets, trailing bytes, size
mismatch, duplicate names, bad UTF-8/JSON, unexpected dtypes) gives one clear ``FormatError``
naming the file and tensor, and never a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, ValidationError

#: the header is JSON; real adapter headers are kilobytes. 100 MB is the format's own limit.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: dtypes a LoRA adapter may hold (floating point only)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise FormatError(f"duplicate tensor name {k!r} in safetensors header")
        seen[k] = v
    return seen


def inspect_safetensors(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the structure of a safetensors file; return its tensor table and metadata."""
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError("file too short for a safetensors header", where=where, hint="the file is truncated or not safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"header length {n} is larger than the file or the 100 MB limit", where=where,
                                  hint="the file is truncated or not safetensors")
            raw = fh.read(n)
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror}", where=where) from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except FormatError as exc:
        raise FormatError(exc.what, where=where) from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: '[[[[...' nesting
        raise FormatError(f"header is not valid UTF-8 JSON ({type(exc).__name__})", where=where) from exc
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object", where=where)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError("__metadata__ must map strings to strings", where=where)
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        tw = f"{where} [{name}]"
        if not isinstance(spec, dict) or set(spec) - {"dtype", "shape", "data_offsets"}:
            raise FormatError("tensor entry must have dtype, shape, data_offsets", where=tw)
        dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"unknown dtype {dtype!r}", where=tw)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"bad shape {shape!r}", where=tw)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise FormatError(f"data offsets {offs!r} outside the data area of {data_len} bytes", where=tw)
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offs[1] - offs[0] != expected:
            raise FormatError(f"{dtype} {shape} needs {expected} bytes but offsets span {offs[1] - offs[0]}", where=tw)
        infos[name] = TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])
    pos = 0
    for info in sorted(infos.values(), key=lambda t: (t.start, t.end)):
        if info.start != pos:
            kind = "overlaps the previous tensor" if info.start < pos else "leaves a gap before it"
            raise FormatError(f"tensor data {kind}", where=f"{where} [{info.name}]")
        pos = info.end
    if pos != data_len:
        raise FormatError(f"{data_len - pos} trailing bytes after the last tensor", where=where, hint="the file was modified or is not safetensors")
    return infos, meta


def load_safetensors(path: str | os.PathLike, *, allowed_dtypes: frozenset[str] | None = FLOAT_DTYPES, check_finite: bool = True):
    """Load all tensors after validating the header; refuse disallowed dtypes and NaN/Inf values."""
    import torch
    from safetensors.torch import load_file

    infos, _ = inspect_safetensors(path)
    if allowed_dtypes is not None:
        for info in infos.values():
            if info.dtype not in allowed_dtypes:
                raise ValidationError(f"dtype {info.dtype} is not allowed here (allowed: {', '.join(sorted(allowed_dtypes))})",
                                      where=f"{path} [{info.name}]")
    tensors = load_file(str(path))
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValidationError("tensor contains NaN or Inf values", where=f"{path} [{name}]", hint="the adapter is corrupt or training diverged")
    return tensors

"""Task data: files -> normalized rows -> token ids with response-only loss labels.

Files are JSONL / JSON / CSV / Parquet, read with the ``datasets`` library (local files only).
A *data path* is a file, or a directory holding ``train.jsonl`` / ``validation.jsonl`` /
``test.jsonl`` (any of the supported extensions).

Accepted row shapes (extra fields such as ``id`` and ``task`` are kept):

* ``{"prompt": str, "response": str}``
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (ends with an assistant turn)
* ``{"text": str}`` (plain language-model data: the loss covers every token)

Normalized rows always carry ``id`` and ``task``, plus ``prompt`` + ``response``, or ``messages`` +
``response`` (the last assistant message, the gold answer), or ``text``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .hashing import sha256_file, sha256_json

IGNORE_INDEX = -100
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")
_HINT = 'each row needs {"prompt", "response"}, {"messages": [...]}, or {"text"}'


# ----------------------------------------------------------------------------------------- files
def split_file(path: str | os.PathLike, split: str) -> Path | None:
    """The file of ``split`` in a data directory (``train.jsonl``, ``validation.parquet``...), or None."""
    d = Path(path)
    for ext in FORMATS:
        if (d / f"{split}{ext}").is_file():
            return d / f"{split}{ext}"
    return None


def resolve_file(path: str | os.PathLike, split: str | None = None) -> Path:
    """A data path (file, or directory + split) -> the one file to read."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = split_file(p, split or "train")
        if f is None:
            raise DataError(f"no {split or 'train'}.jsonl/.json/.csv/.parquet file", where=str(p),
                            hint="pass a data file, or a directory with train/validation/test files")
        return f
    if not p.is_file():
        raise DataError("data file not found", where=str(p), hint="check the path (data is read from local files only)")
    if p.suffix.lower() not in FORMATS:
        raise DataError(f"unknown data format {p.suffix!r}", where=str(p), hint="use .jsonl, .json, .csv or .parquet")
    return p


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Raw records of one file via ``datasets``; JSONL parse errors are pinned to a line by a stdlib rescan."""
    import datasets

    fmt = FORMATS[path.suffix.lower()]
    # datasets logs its own parse errors and progress bars; we raise one clear error instead
    dlog = datasets.utils.logging.get_logger("datasets")
    level, bars = dlog.getEffectiveLevel(), datasets.utils.is_progress_bar_enabled()
    dlog.setLevel(50)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
        return ds.to_list()
    except Exception as exc:  # pyarrow/datasets errors are long; find the bad line ourselves when we can
        if fmt != "json":
            raise DataError(f"cannot read {fmt} file: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                            where=str(path)) from exc
        return _read_jsonl_stdlib(path, exc)
    finally:
        dlog.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _read_jsonl_stdlib(path: Path, first_exc: Exception) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array file
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON at line {exc.lineno}: {exc.msg}", where=str(path)) from exc
        return [r if isinstance(r, dict) else {"__not_an_object__": r} for r in rows]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"row {len(rows) + 1} (line {lineno}): invalid JSON: {exc.msg}", where=str(path),
                            hint="one JSON object per line") from exc
        rows.append(obj if isinstance(obj, dict) else {"__not_an_object__": obj})
    if not rows:
        raise DataError(f"no rows ({type(first_exc).__name__})", where=str(path))
    return rows


# ------------------------------------------------------------------------------------------ rows
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None, or NaN from CSV/pandas


def normalize_row(rec: dict[str, Any], index: int, *, where: str, task: str | None = None, id_prefix: str = "row") -> dict:
    """Validate one raw record (``index`` is 0-based) and return its normalized form."""
    n = index + 1

    def bad(msg: str) -> DataError:
        return DataError(f"row {n}: {msg}", where=where, hint=_HINT)

    if "__not_an_object__" in rec:
        raise bad("is not a JSON object")
    out: dict[str, Any] = {"id": str(rec["id"]) if not _missing(rec.get("id")) else f"{id_prefix}-{index}",
                           "task": rec.get("task") if not _missing(rec.get("task")) else task}
    msgs = rec.get("messages")
    if not _missing(msgs):
        if isinstance(msgs, str):  # CSV cells hold JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as exc:
                raise bad("field 'messages' is not a JSON list") from exc
        if not isinstance(msgs, list) or not msgs:
            raise bad("field 'messages' must be a non-empty list")
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad(f"messages[{j}] needs 'role' (system/user/assistant) and string 'content'")
            clean.append({"role": m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant":
            raise bad("the last message must be the assistant's answer")
        out.update(messages=clean, response=clean[-1]["content"])
        return out
    has_p, has_r = not _missing(rec.get("prompt")), not _missing(rec.get("response"))
    if has_p or has_r:
        for key, ok in (("prompt", has_p), ("response", has_r)):
            if not ok:
                raise bad(f"missing field '{key}'")
            if not isinstance(rec[key], str):
                raise bad(f"field '{key}' must be a string, got {type(rec[key]).__name__}")
        if not rec["prompt"].strip() or not rec["response"].strip():
            raise bad("empty 'prompt' or 'response'")
        out.update(prompt=rec["prompt"], response=rec["response"])
        return out
    if not _missing(rec.get("text")):
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise bad("field 'text' must be a non-empty string")
        out["text"] = rec["text"]
        return out
    present = sorted(k for k, v in rec.items() if not _missing(v))
    raise bad(f"missing field 'prompt'/'response', 'messages' or 'text' (has: {', '.join(present) or 'nothing'})")


def load_rows(path: str | os.PathLike, split: str | None = None, *, task: str | None = None) -> list[dict]:
    """Read and validate every row of a data file (or ``<dir>/<split>.*``, default split ``train``).

    Raises ``DataError`` naming the file and the 1-based row number of the first bad row.
    """
    f = resolve_file(path, split)
    recs = _read_records(f)
    if not recs:
        raise DataError("no rows", where=str(f))
    prefix = f"{f.parent.name}-{f.stem}" if f.stem in ("train", "validation", "test") else f.stem
    return [normalize_row(r, i, where=str(f), task=task, id_prefix=prefix) for i, r in enumerate(recs)]


def split_rows(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """Carve a validation set out deterministically: rows ordered by a hash of their id (order-independent)."""
    if val_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    order = sorted(range(len(rows)), key=lambda i: (hashlib.sha256(str(rows[i]["id"]).encode()).hexdigest(), i))
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def data_fingerprint(files: list[str | os.PathLike | None]) -> str:
    """sha256 over the contents of the data files used (train, validation); names do not matter."""
    return sha256_json([sha256_file(f) if f else None for f in files])


# ---------------------------------------------------------------------------------- tokenization
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to (not including) the answer to generate."""
    if "messages" in row:
        return row["messages"][:-1]
    return [{"role": "user", "content": row["prompt"]}]


def format_prompt(row: dict, tokenizer) -> str:
    """The exact text a model sees before its answer (training and generation use the same one)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)
    msgs = prompt_messages(row)
    return "\n\n".join(m["content"] for m in msgs).rstrip() + "\n"


def _segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """The row as ``(text, is_target)`` segments whose concatenation is the full training text."""
    eos = tokenizer.eos_token or ""
    if "text" in row:
        return [(row["text"] + eos, True)]
    prompt = format_prompt(row, tokenizer)
    if has_chat_template(tokenizer):
        full_msgs = prompt_messages(row) + [{"role": "assistant", "content": row["response"]}]
        full = tokenizer.apply_chat_template(full_msgs, tokenize=False)
        if full.startswith(prompt):  # true for ChatML-like templates; the answer includes the end-of-turn token
            return [(prompt, False), (full[len(prompt):], True)]
        return [(prompt, False), (row["response"] + eos, True)]
    return [(prompt, False), (row["response"] + eos, True)]


@dataclass
class TokenizedSet:
    """Tokenized examples (``input_ids``/``labels`` as lists of ints, labels -100 off the answer)."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    n_rows: int = 0
    n_truncated: int = 0           # rows cut to ``max_length``
    n_dropped: int = 0             # rows whose answer was cut away entirely (no target tokens left)
    n_target_tokens: int = 0


def tokenize_example(row: dict, tokenizer, max_length: int) -> tuple[dict[str, list[int]], bool]:
    """One row -> ``{"input_ids", "labels"}`` (length <= max_length) and whether it was truncated.

    Segments are tokenized separately, so the prompt tokens are exactly those seen at generation time.
    """
    ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    add_bos = not has_chat_template(tokenizer) and bos is not None and getattr(tokenizer, "add_bos_token", False)
    if add_bos:
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    for text, target in _segments(row, tokenizer):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(seg)
        labels.extend(seg if target else [IGNORE_INDEX] * len(seg))
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, truncated


def tokenize_rows(rows: list[dict], tokenizer, max_length: int) -> TokenizedSet:
    """Tokenize rows; rows left with no target tokens after truncation are dropped (and counted)."""
    out = TokenizedSet(n_rows=len(rows))
    for row in rows:
        ex, cut = tokenize_example(row, tokenizer, max_length)
        n_target = sum(1 for x in ex["labels"] if x != IGNORE_INDEX)
        out.n_truncated += int(cut)
        if n_target == 0:
            out.n_dropped += 1
            continue
        out.n_target_tokens += n_target
        out.examples.append(ex)
    return out


def collate(examples: list[dict[str, list[int]]], pad_id: int):
    """Pad to the longest example in the batch (right padding).

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long with -100 on padding.
    """
    import torch

    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

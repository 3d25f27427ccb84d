"""Evaluation rows from a data file, a data directory, or a recipe, in the training-data row formats.

``--data`` may be:

* a data file (JSONL/JSON/CSV/Parquet): used as is; with an explicit ``--split`` that differs from the
  file's name (``train.jsonl`` + ``--split test``), the sibling ``test.*`` file is used instead;
* a directory with ``<split>.*`` files, or a directory of task directories each holding ``<split>.*``;
* a recipe (``.yaml``/``.yml``): every expert's data (its ``data`` or ``train.data``), the knowledge
  expert's data and ``calibration.general_data`` (as task ``general``), each at ``<split>``.

Rows without a ``task`` take their directory's name (``diagnosis/test.jsonl`` -> ``diagnosis``) or
the recipe expert's task. A missing split is one ``DataError`` naming the place it was looked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import FORMATS, load_rows, split_file
from .errors import DataError

DEFAULT_SPLIT = "test"
SPLITS = ("train", "validation", "test")


def _task_of(path: Path) -> str:
    """Default task name of a file: its folder for split-named files, else its stem."""
    return path.parent.name if path.stem in SPLITS else path.stem


def split_path(path: str | os.PathLike, split: str | None, *, where: str | None = None) -> Path:
    """The file holding ``split`` for a data path (file or directory); DataError if there is none."""
    p = Path(path).expanduser()
    if p.is_dir():
        f = split_file(p, split or DEFAULT_SPLIT)
        if f is None:
            raise DataError(f"no {split or DEFAULT_SPLIT} split (no {split or DEFAULT_SPLIT}.jsonl/.json/.csv/.parquet)",
                            where=where or str(p), hint="pass --split with an existing split, or a data file")
        return f
    if not p.is_file():
        raise DataError("data file not found", where=where or str(p), hint="check the path")
    if split is None or p.stem == split:
        return p
    f = split_file(p.parent, split) or _renamed_split(p, split)
    if f is None:
        raise DataError(f"no {split} split next to {p.name} (looked for {split}.jsonl/.json/.csv/.parquet)",
                        where=where or str(p.parent), hint=f"create {split}.jsonl, pass --split with an existing split, or pass the file itself")
    return f


_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",), "train": ("train",)}


def _renamed_split(p: Path, split: str) -> Path | None:
    """``diag_train.jsonl`` -> ``diag_test.jsonl`` (also ``.train.``, ``-train-``): split files named after their task."""
    import re

    for cur in ("train", "validation", "valid", "val", "dev", "test"):
        pat = re.compile(rf"(?<![A-Za-z]){cur}(?![A-Za-z])")
        if cur == split or not pat.search(p.stem):
            continue
        for alias in _ALIASES.get(split, (split,)):
            q = p.with_name(pat.sub(alias, p.stem, count=1) + p.suffix)
            if q.is_file():
                return q
    return None


def _load(path: Path, task: str | None, **tags) -> list[dict]:
    rows = load_rows(path, task=task or _task_of(path))
    for r in rows:
        r.update(tags)
    return rows


def _maybe(fn, skip_missing: bool):
    """Call ``fn``; with ``skip_missing`` a DataError (missing split) gives no rows instead."""
    try:
        return fn()
    except DataError:
        if skip_missing:
            return []
        raise


def _from_recipe(path: Path, split: str | None, general_task: str, skip_missing: bool = False) -> list[dict]:
    from .recipe import load_recipe

    recipe = load_recipe(path)
    split = split or DEFAULT_SPLIT
    rows: list[dict] = []
    for i, e in enumerate(recipe.experts):
        src = e.calibration_data
        if src is None:
            continue
        task = (e.train or {}).get("task") or e.name
        where = f"{path}: experts[{i}] ({e.name}) data"
        rows += _maybe(lambda: _load(split_path(recipe.resolve_path(src), split, where=where), task, expert=e.name),
                       skip_missing)
    general: list[tuple[str, str | None]] = []
    if recipe.knowledge_expert is not None and recipe.knowledge_expert.calibration_data:
        general.append(("knowledge_expert", recipe.knowledge_expert.calibration_data))
    if recipe.calibration is not None and recipe.calibration.general_data:
        general.append(("calibration.general_data", recipe.calibration.general_data))
    seen: set[Path] = set()
    for key, src in general:
        f = _maybe(lambda: split_path(recipe.resolve_path(src), split, where=f"{path}: {key}"), skip_missing)
        if not f or f.resolve() in seen:
            continue
        seen.add(f.resolve())
        for r in _load(f, general_task):
            r["task"] = general_task
            rows.append(r)
    if not rows:
        raise DataError("the recipe names no expert data", where=str(path),
                        hint="give experts a train.data or data path, or pass --data FILE")
    return rows


def load_eval_rows(data: str | os.PathLike, split: str | None = None, *, probe: str | os.PathLike | None = None,
                   general_task: str = "general", limit: int | None = None, skip_missing: bool = False) -> list[dict]:
    """Normalized evaluation rows (``data.load_rows`` form plus ``task``), probes last, ``limit`` rows per task.

    ``skip_missing``: tasks (recipe experts, task folders) without ``split`` are skipped instead of an error.
    """
    p = Path(data).expanduser()
    if p.suffix.lower() in (".yaml", ".yml"):
        rows = _from_recipe(p, split, general_task, skip_missing)
    elif p.is_dir() and split_file(p, split or DEFAULT_SPLIT) is None and any(
            x.is_dir() and any((x / f"{s}{ext}").is_file() for s in SPLITS for ext in FORMATS) for x in p.iterdir()):
        # a directory of task directories: every task at the split (a task missing it is an error)
        rows = []
        for d in sorted(x for x in p.iterdir() if x.is_dir() and any(x.glob("*.*"))):
            if any((d / f"{s}{ext}").is_file() for s in SPLITS for ext in FORMATS):
                rows += _maybe(lambda: _load(split_path(d, split), d.name), skip_missing)
    else:
        rows = _load(split_path(p, split), None)
    if probe is not None:
        for r in _load(split_path(probe, None), general_task):
            r["task"], r["probe"] = general_task, True
            r["id"] = f"probe-{r['id']}"
            rows.append(r)
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for r in rows:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
            if counts[r["task"]] <= limit:
                kept.append(r)
        rows = kept
    if not any("response" in r for r in rows):
        raise DataError("no rows with an answer to evaluate", where=str(p),
                        hint='evaluation rows need {"prompt", "response"} or {"messages": [...]}')
    return rows


def reference_answers(data: str | os.PathLike, split: str | None = None, *, general_task: str = "general") -> dict[str, list[str]]:
    """Gold answers of the ``train`` split next to the evaluation data, per task (empty if there is none).

    The metric choice (fixed label set or free text) then does not depend on how many evaluation
    rows there are (``--limit``, a small test file), and labels absent from the test split still count
    as labels (a prediction naming one is a wrong label, not an unrecognised answer).
    """
    if (split or DEFAULT_SPLIT) == "train":
        return {}
    try:
        rows = load_eval_rows(data, "train", general_task=general_task, skip_missing=True)
    except DataError:
        return {}
    out: dict[str, list[str]] = {}
    for r in rows:
        if "response" in r:
            out.setdefault(str(r["task"]), []).append(r["response"])
    return out

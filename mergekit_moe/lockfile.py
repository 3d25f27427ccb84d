"""Lock files: pin every ``hf://`` expert of a recipe to a commit SHA and the sha256 of its files.

``moemerge compose recipe.yaml`` writes ``recipe.lock.json`` next to the recipe the first time it
resolves Hub experts; later runs read it, so the same recipe always composes the same bytes.
If a locked name later serves different content, the run fails unless ``--update`` is given
(see :func:`mergekit_moe.hub.fetch_expert`). Format::

    {
      "format_version": 1,
      "experts": {
        "hf://org/repo@main:experts/dx": {
          "repo": "org/repo", "revision": "main", "subfolder": "experts/dx",
          "commit": "<40 hex>", "digest": "<bundle digest>", "verified": true,
          "files": {"adapter_model.safetensors": {"sha256": "<64 hex>", "size": 1234}, ...}
        }
      }
    }

Loading is defensive: the lock may be edited by hand or come with a shared recipe, so commit
SHAs, hashes and file names are validated (no ``..``, absolute paths or backslashes).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_text, dump_json
from .errors import FormatError
from .refs import COMMIT_RE, HubRef, parse_ref

LOCK_FORMAT_VERSION = 1
MAX_LOCK_BYTES = 4 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def lock_path_for(recipe_path: str | os.PathLike) -> Path:
    """``dir/recipe.yaml`` -> ``dir/recipe.lock.json``."""
    p = Path(recipe_path)
    return p.with_name(p.stem + ".lock.json")


@dataclass
class LockEntry:
    """What one ``hf://`` reference resolved to: commit SHA, bundle digest, file hashes."""

    repo: str
    revision: str | None
    subfolder: str
    commit: str
    files: dict[str, dict]
    digest: str = ""
    verified: bool = True

    @property
    def ref(self) -> HubRef:
        return HubRef(self.repo, self.revision, self.subfolder)

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "subfolder": self.subfolder, "commit": self.commit,
                "digest": self.digest, "verified": self.verified,
                "files": {k: {"sha256": v["sha256"], "size": v["size"]} for k, v in sorted(self.files.items())}}

    def same_content(self, files: dict[str, dict]) -> bool:
        """True when ``files`` (relpath -> {sha256, size}) equals the locked manifest."""
        return {k: (v["sha256"], v["size"]) for k, v in files.items()} == \
               {k: (v["sha256"], v["size"]) for k, v in self.files.items()}


@dataclass
class LockFile:
    """A recipe's lock file. ``entries`` maps the canonical ``hf://`` URL to a :class:`LockEntry`."""

    path: Path
    entries: dict[str, LockEntry] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def for_recipe(cls, recipe_path: str | os.PathLike) -> "LockFile":
        return cls.load(lock_path_for(recipe_path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LockFile":
        """Read a lock file; a missing file gives an empty lock. FormatError/UnsafeFileError on bad content."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        if path.is_symlink() or not path.is_file():
            raise FormatError("lock file is not a regular file", where=str(path))
        if path.stat().st_size > MAX_LOCK_BYTES:
            raise FormatError(f"lock file is larger than {MAX_LOCK_BYTES // 1024 // 1024} MB", where=str(path))
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise FormatError(f"lock file is not valid JSON ({type(exc).__name__})", where=str(path),
                              hint="delete it and run again with --update to re-resolve") from exc
        if not isinstance(d, dict) or d.get("format_version") != LOCK_FORMAT_VERSION:
            raise FormatError(f"unsupported lock format_version {d.get('format_version') if isinstance(d, dict) else None!r}",
                              where=str(path), hint="delete it and run again with --update")
        experts = d.get("experts") or {}
        if not isinstance(experts, dict):
            raise FormatError("experts must be a mapping", where=f"{path}: experts")
        lock = cls(path)
        for key, raw in experts.items():
            lock.entries[key] = _entry_from_dict(key, raw, where=f"{path}: experts.{key}")
        return lock

    def get(self, ref: HubRef) -> LockEntry | None:
        return self.entries.get(ref.url())

    def set(self, ref: HubRef, entry: LockEntry) -> None:
        key = ref.url()
        if key not in self.entries or self.entries[key].to_dict() != entry.to_dict():
            self.entries[key] = entry
            self.dirty = True

    def save(self) -> Path:
        """Write the lock atomically (sorted keys: diffs stay small and stable)."""
        doc = {"format_version": LOCK_FORMAT_VERSION,
               "experts": {k: e.to_dict() for k, e in sorted(self.entries.items())}}
        atomic_write_text(self.path, dump_json(doc))
        self.dirty = False
        return self.path


def _entry_from_dict(key: str, raw, *, where: str) -> LockEntry:
    from .bundle import check_relpath

    if not isinstance(raw, dict):
        raise FormatError("lock entry must be a mapping", where=where)
    ref = parse_ref(key)
    commit = raw.get("commit")
    if not isinstance(commit, str) or not COMMIT_RE.match(commit):
        raise FormatError(f"commit {commit!r} is not a 40-hex commit SHA", where=f"{where}.commit")
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise FormatError("files must be a non-empty mapping", where=f"{where}.files")
    clean: dict[str, dict] = {}
    for rel, rec in files.items():
        check_relpath(rel, where=f"{where}.files")
        if (not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not _SHA256_RE.match(rec["sha256"])
                or not isinstance(rec.get("size"), int) or isinstance(rec.get("size"), bool) or rec["size"] < 0):
            raise FormatError("file entry needs sha256 (64 hex) and size", where=f"{where}.files.{rel}")
        clean[rel] = {"sha256": rec["sha256"], "size": rec["size"]}
    if raw.get("repo", ref.repo_id) != ref.repo_id or (raw.get("subfolder") or "") != ref.subfolder:
        raise FormatError("entry does not match its key (repo or subfolder differ)", where=where)
    digest = raw.get("digest") or ""
    if not isinstance(digest, str):
        raise FormatError("digest must be a string", where=f"{where}.digest")
    return LockEntry(ref.repo_id, ref.revision, ref.subfolder, commit, clean, digest, bool(raw.get("verified", True)))

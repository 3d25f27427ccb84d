"""Local registry: content-addressed bundle store + SQLite index under ``$MOEMERGE_HOME``.

Layout::

    $MOEMERGE_HOME/            (default: platformdirs.user_cache_dir("moemerge"))
      index.sqlite             entries(digest, name, version, task, base, fingerprint, tags, ...)
      store/<digest>/          one verified bundle per content digest (bundle.compute_digest)
      .lock                    cross-process lock held by every write

Writes take the file lock, build the new store directory in a staging directory (verified
before it is renamed into place) and only then insert the index row in a transaction. A crash
at any point leaves the index as it was; a store directory without an index row is an orphan
that the next ``add`` of the same digest replaces and ``gc`` removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .atomic import dump_json, leftover_staging, staging_dir
from .bundle import EXPERT_JSON, README, SIGNATURE, Bundle, ExpertMeta, compute_digest, now_iso, read_bundle
from .errors import RegistryError
from .hashing import sha256_bytes

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
LOCK_TIMEOUT_S = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    task TEXT NOT NULL,
    base_model TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at TEXT NOT NULL,
    provenance TEXT NOT NULL,
    content_key TEXT NOT NULL,
    added_at TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS entries_name ON entries(name);
"""


@dataclass
class Entry:
    """One registered expert (a row of the index)."""

    name: str
    version: str
    task: str
    digest: str
    path: Path
    base_model: str
    base_fingerprint: str
    tags: list[str]
    created_at: str
    provenance: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def default_home() -> Path:
    env = os.environ.get("MOEMERGE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("moemerge"))


def _version_key(v: str) -> tuple:
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def content_key(files: dict[str, dict]) -> str:
    """Identity of the adapter itself (config + weights), whatever the metadata says."""
    return sha256_bytes("|".join(files.get(k, {}).get("sha256", "") for k in ("adapter_config.json", "adapter_model.safetensors")).encode())


class Registry:
    """The local expert registry. ``home`` defaults to ``$MOEMERGE_HOME`` or the user cache dir."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.store = self.home / "store"
        self.db_path = self.home / "index.sqlite"

    # -- plumbing ---------------------------------------------------------------------------
    def _connect(self, *, write: bool = True) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit). Reads never create or write anything."""
        if not write:
            con = sqlite3.connect(self.db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=60, isolation_level=None)
            con.row_factory = sqlite3.Row
            return con
        self.store.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.executescript(_SCHEMA)
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            con.close()
            raise RegistryError(f"registry index has schema {row[0]}, this mergekit-moe reads {SCHEMA_VERSION}",
                                where=str(self.db_path), hint="upgrade mergekit-moe")
        return con

    @contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock, Timeout

        self.home.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.home / ".lock"), timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout as exc:
            raise RegistryError("the registry is locked by another moemerge process", where=str(self.home / ".lock"),
                                hint="wait for it to finish; delete the lock file only if no moemerge process is running") from exc

    def _entry(self, row: sqlite3.Row) -> Entry:
        return Entry(name=row["name"], version=row["version"], task=row["task"], digest=row["digest"],
                     path=self.store / row["digest"], base_model=row["base_model"], base_fingerprint=row["base_fingerprint"],
                     tags=json.loads(row["tags"]), created_at=row["created_at"], provenance=json.loads(row["provenance"]))

    def _rows(self, sql: str = "", args: tuple = ()) -> list[Entry]:
        if not self.db_path.exists():
            return []
        with closing(self._connect(write=False)) as con:
            try:
                rows = con.execute(f"SELECT * FROM entries {sql}", args).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []  # created but never written (a crash before the first commit)
                raise RegistryError(f"cannot read the registry index: {exc}", where=str(self.db_path),
                                    hint="another process may hold it; retry, or check the file") from exc
        out = [self._entry(r) for r in rows]
        return sorted(out, key=lambda e: (e.name, _version_key(e.version)))

    # -- queries ----------------------------------------------------------------------------
    def find(self, *, name: str | None = None, task: str | None = None, base_fingerprint: str | None = None,
             tag: str | None = None) -> list[Entry]:
        """Entries matching every given filter, sorted by name then version."""
        conds, args = [], []
        for col, val in (("name", name), ("task", task), ("base_fingerprint", base_fingerprint)):
            if val is not None:
                conds.append(f"{col} = ?")
                args.append(val)
        entries = self._rows(("WHERE " + " AND ".join(conds)) if conds else "", tuple(args))
        return [e for e in entries if tag is None or tag in e.tags]

    def resolve(self, ref: str) -> Entry:
        """``name`` (latest version), ``name@version`` or ``sha256:<prefix>`` -> Entry."""
        ref = ref.strip()
        if ref.startswith("sha256:"):
            prefix = ref[len("sha256:"):].lower()
            if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
                raise RegistryError(f"bad digest reference {ref!r}", hint="use sha256: followed by at least 4 hex digits")
            hits = self._rows("WHERE digest LIKE ?", (prefix + "%",))
            if len(hits) > 1:
                raise RegistryError(f"{ref} is ambiguous: {', '.join(e.ref for e in hits)}", hint="give more digest characters")
            if not hits:
                raise RegistryError(f"no expert with digest {ref}", hint="see `moemerge list`")
            return hits[0]
        name, _, version = ref.partition("@")
        hits = self.find(name=name)
        if not hits:
            known = sorted({e.name for e in self._rows()})
            close = [k for k in known if name.lower() in k.lower() or k.lower() in name.lower()]
            hint = f"did you mean {', '.join(close[:3])}?" if close else (f"known: {', '.join(known[:8])}" if known else "the registry is empty; use `moemerge import` or `moemerge pull`")
            raise RegistryError(f"no expert named {name!r} in the registry", where=str(self.home), hint=hint)
        if version:
            for e in hits:
                if e.version == version:
                    return e
            raise RegistryError(f"{name} has no version {version!r}", hint=f"versions: {', '.join(e.version for e in hits)}")
        return hits[-1]

    def bundle(self, ref: str) -> Bundle:
        return read_bundle(self.resolve(ref).path)

    def verify(self, ref: str) -> Entry:
        """Re-hash a registered bundle's files; IntegrityError names the file."""
        e = self.resolve(ref)
        read_bundle(e.path).verify()
        return e

    # -- writes -----------------------------------------------------------------------------
    def add(self, bundle_dir: str | os.PathLike, *, provenance: dict | None = None, name: str | None = None,
            version: str | None = None) -> Entry:
        """Copy a verified bundle into the store and index it. Idempotent for identical content.

        A different adapter under an existing name gets the next integer version unless
        ``version`` is given (then a clash is an error). The same adapter under the same name
        returns the existing entry.
        """
        src = read_bundle(bundle_dir)
        src.verify()
        src.adapter()  # safetensors header, dtypes, NaN/Inf and rank checks before anything is stored
        meta = ExpertMeta(**src.meta.to_dict())
        if name is not None:
            meta.name = name
        if version is not None:
            meta.version = str(version)
        if provenance is not None:
            meta.provenance = dict(provenance)
        if not NAME_RE.match(meta.name):
            raise RegistryError(f"invalid expert name {meta.name!r}", hint="use letters, digits, '.', '_' or '-' (no '@', ':' or '/')")
        if not NAME_RE.match(meta.version):
            raise RegistryError(f"invalid version {meta.version!r}", hint="use letters, digits, '.', '_' or '-'")
        ckey = content_key(src.files)
        with self._locked(), closing(self._connect()) as con:
            same_name = [self._entry(r) for r in con.execute("SELECT * FROM entries WHERE name = ?", (meta.name,))]
            for row in con.execute("SELECT * FROM entries WHERE name = ? AND content_key = ?", (meta.name, ckey)):
                if version is None or row["version"] == meta.version:
                    return self._entry(row)  # this adapter is already registered under this name
            taken = {e.version for e in same_name}
            if meta.version in taken:
                if version is not None:
                    raise RegistryError(f"{meta.name}@{meta.version} already exists with different content",
                                        hint="choose another --version, or omit it to get the next one")
                nums = [int(v) for v in taken if v.isdigit()]
                meta.version = str(max(nums, default=0) + 1)
                while meta.version in taken:
                    meta.version = str(int(meta.version) + 1)
            entry = self._store(con, src, meta, ckey)
        return entry

    def import_adapter(self, path: str | os.PathLike, *, name: str | None = None, task: str | None = None,
                       base: str | None = None, version: str | None = None, convert_pickle: bool = False,
                       provenance: dict | None = None, reporter=None, **meta_fields) -> Entry:
        """``moemerge import``: register a bundle, or any PEFT LoRA adapter directory as a new bundle.

        ``meta_fields`` are further ``ExpertMeta`` fields (description, tags, license, metrics...).
        """
        from .bundle import bundle_from_adapter

        path = Path(path)
        if (path / EXPERT_JSON).is_file():
            return self.add(path, name=name, version=version, provenance=provenance)
        if not name or not task:
            raise RegistryError("importing a plain PEFT adapter needs --name and --task", where=str(path))
        if not NAME_RE.match(name):
            raise RegistryError(f"invalid expert name {name!r}", hint="use letters, digits, '.', '_' or '-' (no '@', ':' or '/')")
        self.store.mkdir(parents=True, exist_ok=True)
        prov = {"source": f"local:{path.resolve()}", "imported_at": now_iso(), "verified": False, **(provenance or {})}
        with tempfile.TemporaryDirectory(prefix=".import.staging-", dir=self.store) as tmp:
            built = bundle_from_adapter(path, Path(tmp) / "bundle", name=name, task=task, base=base, convert_pickle=convert_pickle,
                                        reporter=reporter, version=version or "1", provenance=prov, **meta_fields)
            return self.add(built.path, version=version)

    def _store(self, con: sqlite3.Connection, src: Bundle, meta: ExpertMeta, ckey: str) -> Entry:
        from .modelcard import render_card

        files = {k: dict(v) for k, v in src.files.items()}
        card = None
        if (meta.name, meta.version) != (src.meta.name, src.meta.version) or README not in files:
            card = render_card(meta).encode("utf-8")  # the card names the expert: re-render for a new name/version
            files[README] = {"sha256": sha256_bytes(card), "size": len(card)}
        if not meta.created_at:
            meta.created_at = now_iso()
        digest = compute_digest(meta, files)
        row = con.execute("SELECT * FROM entries WHERE digest = ?", (digest,)).fetchone()
        if row is not None:
            return self._entry(row)
        target = self.store / digest
        # an orphan from a crash (store dir without index row) is simply replaced
        with staging_dir(target, overwrite=True) as stage:
            for rel in sorted(files):
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if rel == README and card is not None:
                    dst.write_bytes(card)
                else:
                    shutil.copyfile(src.file(rel), dst)
            d = {"format_version": 1, **meta.to_dict(), "files": files, "digest": digest}
            (stage / EXPERT_JSON).write_text(dump_json(d), encoding="utf-8")
            sig = src.path / SIGNATURE
            if digest == src.digest and sig.is_file() and not sig.is_symlink():
                shutil.copyfile(sig, stage / SIGNATURE)  # still valid: it signs this very digest
            staged = read_bundle(stage)
            staged.verify()  # never rename a copy whose hashes do not verify
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (digest, meta.name, meta.version, meta.task, meta.base_model, meta.base_fingerprint,
                         json.dumps(meta.tags), meta.created_at, json.dumps(meta.provenance, sort_keys=True), ckey, now_iso()))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK") if con.in_transaction else None
            shutil.rmtree(target, ignore_errors=True)
            raise
        return self._entry(con.execute("SELECT * FROM entries WHERE digest = ?", (digest,)).fetchone())

    def remove(self, ref: str) -> Entry:
        """Delete an entry: the index row first (atomic), then its store directory."""
        with self._locked():
            e = self.resolve(ref)
            with closing(self._connect()) as con:
                con.execute("BEGIN IMMEDIATE")
                con.execute("DELETE FROM entries WHERE digest = ?", (e.digest,))
                con.execute("COMMIT")
            if e.path.exists():
                aside = Path(tempfile.mkdtemp(prefix=".removed.old-", dir=self.store))
                os.replace(e.path, aside / "old")
                shutil.rmtree(aside, ignore_errors=True)
        return e

    def gc(self) -> list[Path]:
        """Remove orphan store directories (no index row) and leftover staging directories."""
        with self._locked():
            known = {e.digest for e in self._rows()}
            junk = leftover_staging(self.store)
            if self.store.is_dir():
                junk += [p for p in self.store.iterdir() if not p.name.startswith(".") and p.name not in known]
            for p in junk:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return junk


def open_bundle(ref_or_path: str | os.PathLike, registry: Registry | None = None) -> Bundle:
    """A bundle from a directory path (if it exists) or a registry reference (``name``, ``name@v``, ``sha256:...``)."""
    p = Path(ref_or_path).expanduser()
    if p.is_dir():
        return read_bundle(p)
    return (registry or Registry()).bundle(str(ref_or_path))

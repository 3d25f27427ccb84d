"""Expert bundles: a PEFT LoRA adapter directory plus ``expert.json`` (metadata + sha256 manifest) and a model card.

Layout (every file except ``expert.json`` is listed in its ``files`` manifest)::

    bundle/
      adapter_config.json          PEFT config (unchanged)
      adapter_model.safetensors    LoRA factors: A (r, in), B (out, r) per target module
      README.md                    model card with Hub front matter
      expert.json                  format_version, metadata, files: {relpath: {sha256, size}}, digest
      [extra files, e.g. loss_curve.png]

``PeftModel.from_pretrained(base, bundle)`` loads it as is. The *digest* (content address) is the
sha256 of the manifest plus the metadata, without ``created_at`` and ``provenance``: importing the
same adapter twice with the same metadata gives the same digest.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from .atomic import atomic_write_text, dump_json, staging_dir
from .errors import BundleError, FormatError, IntegrityError, UnsafeFileError, ValidationError
from .hashing import sha256_file, sha256_json
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

EXPERT_JSON = "expert.json"
#: optional detached signature over the digest (signing.py); like expert.json it is not in the manifest
SIGNATURE = "expert.sig"
README = "README.md"
BUNDLE_FORMAT_VERSION = 1
#: expert.json larger than this is refused before parsing (real ones are a few KB)
MAX_EXPERT_JSON_BYTES = 4 * 1024 * 1024
#: present in Hub downloads (local_dir metadata); never part of a bundle, never copied
IGNORED_NAMES = frozenset({".cache", ".gitattributes"})
#: metadata that may differ between copies of one bundle (not part of the digest)
_VOLATILE = ("created_at", "provenance")


@dataclass
class ExpertMeta:
    """Metadata of one expert, stored in ``expert.json``."""

    name: str
    task: str
    base_model: str
    base_fingerprint: str
    version: str = "1"
    description: str = ""
    tags: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    hyperparameters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_fingerprint: str | None = None
    provenance: dict = field(default_factory=dict)  # e.g. {"source": "hf://org/repo", "commit": sha, "verified": False}
    datasets: list[str] = field(default_factory=list)
    created_at: str = ""  # ISO time, filled when written

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = EXPERT_JSON) -> "ExpertMeta":
        known = {f.name: f for f in fields(cls)}
        missing = [k for k in ("name", "task", "base_model", "base_fingerprint") if k not in d]
        if missing:
            raise FormatError(f"missing field(s) {', '.join(missing)}", where=where)
        kw = {k: v for k, v in d.items() if k in known}
        for k, typ in (("tags", list), ("datasets", list), ("hyperparameters", dict), ("metrics", dict), ("provenance", dict)):
            if k in kw and not isinstance(kw[k], typ):
                raise FormatError(f"{k} must be a {typ.__name__}", where=f"{where}: {k}")
        for k in ("name", "task", "base_model", "base_fingerprint", "version", "description", "license", "created_at"):
            if k in kw and not isinstance(kw[k], str):
                if k == "version" and isinstance(kw[k], int) and not isinstance(kw[k], bool):
                    kw[k] = str(kw[k])
                else:
                    raise FormatError(f"{k} must be a string", where=f"{where}: {k}")
        return cls(**kw)


def compute_digest(meta: ExpertMeta, files: dict[str, dict]) -> str:
    """Content address: sha256 over the file manifest and the non-volatile metadata."""
    m = {k: v for k, v in meta.to_dict().items() if k not in _VOLATILE}
    return sha256_json({"format_version": BUNDLE_FORMAT_VERSION, "meta": m, "files": files})


def check_relpath(rel: str, *, where: str) -> PurePosixPath:
    """Refuse manifest paths that could escape the bundle: absolute, ``..``, backslashes, drive letters."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or ":" in rel:
        raise UnsafeFileError(f"unsafe file name {rel!r} in the manifest", where=where, hint="bundle files must be plain relative paths")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise UnsafeFileError(f"path {rel!r} escapes the bundle directory", where=where, hint="bundle files must be plain relative paths")
    return p


def _safe_file(root: Path, rel: str, *, where: str) -> Path:
    """``root/rel`` after checking that no component is a symlink (a link could point anywhere)."""
    check_relpath(rel, where=where)
    cur = root
    for part in rel.split("/"):
        cur = cur / part
        if cur.is_symlink():
            raise UnsafeFileError(f"{rel} is (or goes through) a symbolic link", where=str(root), hint="bundles hold regular files only")
    return cur


def _manifest(root: Path) -> dict[str, dict]:
    """sha256 and size of every regular file under ``root`` except ``expert.json``."""
    out: dict[str, dict] = {}
    for dirpath, dirs, names in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not (rel_dir == Path(".") and d in IGNORED_NAMES))
        for d in dirs:
            if (Path(dirpath) / d).is_symlink():
                raise UnsafeFileError(f"{(rel_dir / d).as_posix()} is a symbolic link", where=str(root), hint="bundles hold regular files only")
        for n in sorted(names):
            rel = (rel_dir / n).as_posix()
            if rel in (EXPERT_JSON, SIGNATURE) or (rel_dir == Path(".") and n in IGNORED_NAMES):
                continue
            p = _safe_file(root, rel, where=str(root))
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


class Bundle:
    """A bundle directory on disk: ``path``, ``meta`` (ExpertMeta), ``files`` (relpath -> {sha256, size})."""

    def __init__(self, path: Path, meta: ExpertMeta, files: dict[str, dict]):
        self.path = Path(path)
        self.meta = meta
        self.files = files

    def __repr__(self) -> str:
        return f"Bundle({self.meta.name}@{self.meta.version}, {self.digest[:12]}, {self.path})"

    @property
    def digest(self) -> str:
        return compute_digest(self.meta, self.files)

    def file(self, rel: str) -> Path:
        """Path of a manifest file, refusing unsafe names and symlinks."""
        if rel not in self.files:
            raise BundleError(f"{rel} is not in the bundle manifest", where=str(self.path / EXPERT_JSON))
        return _safe_file(self.path, rel, where=str(self.path / EXPERT_JSON))

    def verify(self) -> None:
        """Re-hash every file against the manifest. IntegrityError names the first missing/extra/modified file."""
        where_json = str(self.path / EXPERT_JSON)
        for rel, rec in sorted(self.files.items()):
            p = _safe_file(self.path, rel, where=where_json)
            if not p.is_file():
                raise IntegrityError(f"{rel} is missing", where=str(self.path), hint="the bundle is incomplete; re-import or re-pull it")
            size = p.stat().st_size
            if size != rec.get("size"):
                raise IntegrityError(f"{rel} has size {size}, the manifest says {rec.get('size')}", where=str(p),
                                     hint="the file was modified or truncated; re-import or re-pull the bundle")
            if sha256_file(p) != rec.get("sha256"):
                raise IntegrityError(f"{rel} does not match its sha256 in {EXPERT_JSON}", where=str(p),
                                     hint="the file was modified; re-import or re-pull the bundle")
        extra = sorted(set(_manifest_names(self.path)) - set(self.files))
        if extra:
            raise IntegrityError(f"{extra[0]} is not listed in the manifest", where=str(self.path),
                                 hint="remove the file or rebuild the bundle")

    def adapter(self):
        """The LoRA factors (``lora.Adapter``): A (r, in), B (out, r) per module, float32."""
        from .lora import read_adapter

        return read_adapter(self.path)

    def export(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a plain PEFT adapter directory (adapter_config.json + adapter_model.safetensors), atomically."""
        out = Path(out_dir)
        with staging_dir(out, overwrite=overwrite) as stage:
            for rel in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copyfile(self.file(rel), stage / rel)
        return out


def _manifest_names(root: Path) -> list[str]:
    names = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirs[:] = [d for d in dirs if not (rel_dir == Path(".") and d in IGNORED_NAMES)]
        for d in dirs:  # os.walk does not descend into linked directories: say so instead of skipping them silently
            if (Path(dirpath) / d).is_symlink():
                raise UnsafeFileError(f"{(rel_dir / d).as_posix()} is a symbolic link", where=str(root), hint="bundles hold regular files only")
        names += [(rel_dir / n).as_posix() for n in files if not (rel_dir == Path(".") and (n in IGNORED_NAMES or n in (EXPERT_JSON, SIGNATURE)))]
    return names


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle directory's ``expert.json``. FormatError / UnsafeFileError on bad metadata or unsafe paths."""
    root = Path(path)
    ej = root / EXPERT_JSON
    if not ej.is_file():
        raise BundleError(f"no {EXPERT_JSON}", where=str(root), hint="not an expert bundle; use `moemerge import` for a plain PEFT adapter")
    if ej.is_symlink():
        raise UnsafeFileError(f"{EXPERT_JSON} is a symbolic link", where=str(root))
    if ej.stat().st_size > MAX_EXPERT_JSON_BYTES:
        raise FormatError(f"{EXPERT_JSON} is larger than {MAX_EXPERT_JSON_BYTES // 1024 // 1024} MB", where=str(ej))
    try:
        d = json.loads(ej.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"not valid JSON ({type(exc).__name__})", where=str(ej)) from exc
    if not isinstance(d, dict):
        raise FormatError("must be a JSON object", where=str(ej))
    fv = d.get("format_version")
    if fv != BUNDLE_FORMAT_VERSION:
        raise FormatError(f"format_version {fv!r} is not supported (expected {BUNDLE_FORMAT_VERSION})", where=str(ej),
                          hint="upgrade mergekit-moe" if isinstance(fv, int) and fv > BUNDLE_FORMAT_VERSION else None)
    files = d.get("files")
    if not isinstance(files, dict) or not files:
        raise FormatError("files manifest is missing or empty", where=f"{ej}: files")
    for rel, rec in files.items():
        check_relpath(rel, where=f"{ej}: files")
        if rel in (EXPERT_JSON, SIGNATURE):
            raise FormatError(f"{rel} cannot be listed in its own manifest", where=f"{ej}: files")
        if (not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or len(rec["sha256"]) != 64
                or not isinstance(rec.get("size"), int) or isinstance(rec.get("size"), bool) or rec["size"] < 0):
            raise FormatError("manifest entry needs sha256 (64 hex) and size", where=f"{ej}: files.{rel}")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in files:
            raise BundleError(f"{required} is not in the manifest", where=f"{ej}: files", hint="a bundle must be a PEFT safetensors adapter")
    meta = ExpertMeta.from_dict(d, where=str(ej))
    b = Bundle(root, meta, {k: dict(sha256=v["sha256"], size=v["size"]) for k, v in files.items()})
    if "digest" in d and d["digest"] != b.digest:
        raise IntegrityError("stored digest does not match the manifest and metadata", where=str(ej), hint="expert.json was edited by hand")
    return b


def _expert_json(meta: ExpertMeta, files: dict[str, dict]) -> dict:
    d = {"format_version": BUNDLE_FORMAT_VERSION, **meta.to_dict(), "files": files}
    d["digest"] = compute_digest(meta, files)
    return d


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def finalize_dir(root: Path, meta: ExpertMeta) -> Bundle:
    """(Re)write README.md and expert.json of a directory being built; returns the Bundle."""
    from .modelcard import render_card

    if not meta.created_at:
        meta.created_at = now_iso()
    atomic_write_text(root / README, render_card(meta))
    files = _manifest(root)
    atomic_write_text(root / EXPERT_JSON, dump_json(_expert_json(meta, files)))
    return Bundle(root, meta, files)


def write_bundle(out_dir: str | os.PathLike, adapter_dir: str | os.PathLike, meta: ExpertMeta, *,
                 extra_files: dict[str, Path] | None = None, overwrite: bool = False) -> Bundle:
    """Build a bundle from a PEFT ``save_pretrained`` directory (safetensors), atomically.

    Copies ``adapter_config.json`` and ``adapter_model.safetensors``, the ``extra_files``
    ({relpath in bundle: source path}), writes ``README.md`` and ``expert.json``.
    """
    from .lora import read_adapter

    src = Path(adapter_dir)
    read_adapter(src)  # refuses non-LoRA configs, missing/invalid safetensors, NaN/Inf, rank mismatches
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError("output directory already exists", where=str(out), hint="pass overwrite=True or choose another directory")
    meta = ExpertMeta(**meta.to_dict())  # never mutate the caller's object
    with staging_dir(out, overwrite=overwrite) as stage:
        for rel in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(src / rel, stage / rel)
        for rel, p in (extra_files or {}).items():
            check_relpath(rel, where="extra_files")
            if rel in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, README, EXPERT_JSON):
                raise BundleError(f"extra file {rel} would overwrite a bundle file", where="extra_files")
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        b = finalize_dir(stage, meta)
    return Bundle(out, b.meta, b.files)


def bundle_from_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, name: str, task: str,
                        base: str | None = None, convert_pickle: bool = False, reporter=None, overwrite: bool = False,
                        **meta_fields) -> Bundle:
    """Turn any PEFT LoRA adapter directory into a bundle (what ``moemerge import`` does before registering).

    Weights must be safetensors; pickle weights (``adapter_model.bin``...) are refused unless
    ``convert_pickle`` (then loaded with ``torch.load(weights_only=True)`` and re-saved). The base
    is ``base`` or the config's ``base_model_name_or_path``; when it can be found locally the
    adapter is validated against it (modules, shapes, ranks) and fingerprinted. ``meta_fields``
    are other ``ExpertMeta`` fields (version, description, tags, license, metrics...).
    """
    import tempfile

    from .base import base_fingerprint, load_config, load_tokenizer
    from .errors import ModelLoadError
    from .lora import read_adapter, read_adapter_config
    from .progress import ensure
    from .validate import convert_pickle_adapter, pickle_weights, validate_adapter

    rep = ensure(reporter)
    src = Path(adapter_dir)
    if not src.is_dir():
        raise BundleError("adapter directory not found", where=str(src), hint="pass a directory written by PEFT save_pretrained")
    cfg = read_adapter_config(src)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=Path(out_dir).parent if Path(out_dir).parent.exists() else None) as tmp:
        work = Path(tmp)
        shutil.copyfile(src / ADAPTER_CONFIG, work / ADAPTER_CONFIG)
        # symlinks are followed here (HF cache snapshots are links into blobs/): the content is copied
        # into regular files; bundles themselves never contain links
        if (src / ADAPTER_WEIGHTS).is_file():
            shutil.copyfile(src / ADAPTER_WEIGHTS, work / ADAPTER_WEIGHTS)
        else:
            pickles = pickle_weights(src)
            if not pickles:
                raise BundleError(f"no {ADAPTER_WEIGHTS}", where=str(src), hint="is this a PEFT LoRA adapter directory?")
            pick = next((p for p in pickles if p.stem == "adapter_model"), pickles[0])
            if not convert_pickle:
                raise UnsafeFileError(f"adapter weights {pick.name} are a pickle file; refusing to load them", where=str(pick),
                                      hint="loading pickle can run arbitrary code: re-save with safetensors, or pass "
                                           "--convert-pickle if you trust the file (it is then read with torch.load(weights_only=True))")
            rep.info(f"converting {pick.name} to safetensors (torch.load weights_only=True)")
            convert_pickle_adapter(pick, work / ADAPTER_WEIGHTS)
        try:
            adapter = read_adapter(work)  # safetensors checks, dtypes, NaN/Inf, rank vs config
        except (FormatError, BundleError, ValidationError) as exc:
            # name the user's file, not the temporary copy (which is gone when the message is read)
            where = exc.where.replace(str(work), str(src)) if exc.where else exc.where
            raise type(exc)(exc.what, where=where, hint=exc.hint) from exc
        base_ref = base or cfg.get("base_model_name_or_path") or ""
        fingerprint = ""
        if base_ref:
            try:
                base_cfg = load_config(base_ref)
                validate_adapter(adapter, base_cfg, where=str(src))
                fingerprint = base_fingerprint(base_cfg, load_tokenizer(base_ref))
            except ModelLoadError:
                if base:
                    raise
                rep.warn(f"base model {base_ref!r} is not available locally: the adapter was not validated against it "
                         "and has no base fingerprint (pass --base)")
        else:
            rep.warn("the adapter names no base model and none was given: not validated (pass --base)")
        hp = {k: cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules") if k in cfg}
        if isinstance(hp.get("target_modules"), (list, set, tuple)):
            hp["target_modules"] = sorted(hp["target_modules"])
        hp.update(meta_fields.pop("hyperparameters", {}) or {})
        meta = ExpertMeta(name=name, task=task, base_model=str(base_ref), base_fingerprint=fingerprint, hyperparameters=hp, **meta_fields)
        return write_bundle(out_dir, work, meta, overwrite=overwrite)

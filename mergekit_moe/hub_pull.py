"""Pull experts from a Hub into the registry (``moemerge pull``), lock-aware fetch for compose, search.

Order of checks in a pull (nothing is deserialized before the last step that needs it):

1. resolve the revision to a 40-hex commit SHA; every later request names that SHA;
2. list the files at that commit: unsafe paths, pickle and code files refuse the pull
   *before any download*;
3. download ``expert.json`` alone (bounded size), check its manifest against the listing
   (names, sizes, types); a plain PEFT repo has no manifest and is marked unverified;
4. download the rest into a staging directory; check each file's git blob id / LFS sha256
   from the listing, then the bundle's sha256 manifest; refuse ``auto_map`` in any JSON;
5. check the base fingerprint when a base is given; register, pinned to the commit.

Any failure deletes the staging directory: no partial file, no registry entry.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BaseMismatchError, BundleError, HubError, IntegrityError, UnsafeFileError
from .hashing import git_blob_sha1, sha256_file
from .hub_client import HubClient, TreeFile
from .progress import Reporter, ensure
from .refs import HubRef, parse_ref

EXPERT_JSON = "expert.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_EXPERT_JSON = 4 * 1024 * 1024
_NAME_CLEAN = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class PullResult:
    entry: object             # registry.Entry
    commit: str               # 40-hex commit SHA the bundle is pinned to
    verified: bool            # True when the repo's own sha256 manifest (expert.json) was verified
    already: bool             # True when the registry already had this repo at this commit (no download)
    files: dict               # remote files: relpath -> {sha256, size} (what a lock file records)


def _provenance(ref: HubRef, commit: str, client: HubClient, verified: bool, files: dict) -> dict:
    from .bundle import now_iso

    return {"source": ref.url(with_revision=False), "repo": ref.repo_id, "revision": ref.rev,
            "subfolder": ref.subfolder, "commit": commit, "endpoint": client.endpoint, "verified": verified,
            "pulled_at": now_iso(), "files": files}


def _registered(registry, ref: HubRef, commit: str, name: str | None):
    for e in registry.find(name=name) if name else registry.find():
        p = e.provenance or {}
        if p.get("source") == ref.url(with_revision=False) and p.get("commit") == commit and e.path.is_dir():
            return e
    return None


def _check_listing(ref: HubRef, tree: dict[str, TreeFile]) -> list[str]:
    """Refuse unsafe names and pickle/code files; return the files worth downloading."""
    from .bundle import check_relpath
    from .hub import SKIPPED_NAMES, _refuse_kind

    wanted = []
    for rel in sorted(tree):
        check_relpath(rel, where=f"{ref.cli()} (file listing)")
        if rel.split("/")[-1] in SKIPPED_NAMES:
            continue
        _refuse_kind(rel, f"{ref.cli()}")
        wanted.append(rel)
    return wanted


def _verify_against_tree(ref: HubRef, rel: str, path: Path, tf: TreeFile) -> dict:
    """Size, then LFS sha256 or git blob id from the listing. Returns {sha256, size}."""
    if path.is_symlink() or not path.is_file():
        raise UnsafeFileError(f"{rel} did not arrive as a regular file", where=ref.cli())
    size = path.stat().st_size
    if size != tf.size:
        raise IntegrityError(f"{rel} has {size} bytes, the Hub lists {tf.size} (truncated or modified download)",
                             where=f"{ref.cli()}", hint="nothing was registered; pull again")
    digest = sha256_file(path)
    if tf.lfs_sha256 and digest != tf.lfs_sha256:
        raise IntegrityError(f"{rel} does not match the sha256 the Hub lists for it", where=ref.cli(),
                             hint="the download was modified in transit or by the server; nothing was registered")
    # regular files: the Hub lists the git blob sha1; accept a server that lists the sha256 instead
    oid = (tf.blob_id or "").lower()
    if not tf.lfs_sha256 and ((len(oid) == 40 and git_blob_sha1(path) != oid) or (len(oid) == 64 and digest != oid)):
        raise IntegrityError(f"{rel} does not match the git object id the Hub lists for it", where=ref.cli(),
                             hint="the download was modified in transit or by the server; nothing was registered")
    return {"sha256": digest, "size": size}


def _download(client: HubClient, ref: HubRef, commit: str, rels: list[str], dl: Path, tree: dict[str, TreeFile],
              rep: Reporter) -> dict[str, dict]:
    from concurrent.futures import ThreadPoolExecutor

    rep.start("download", total=len(rels))

    def one(rel: str) -> tuple[str, dict]:
        path = Path(client.download(ref, commit, rel, str(dl)))
        rec = _verify_against_tree(ref, rel, path, tree[rel])
        rep.advance("download", 1)
        return rel, rec

    with ThreadPoolExecutor(max_workers=min(4, max(1, len(rels)))) as pool:
        out = dict(pool.map(one, rels))
    rep.finish("download")
    return out


def pull(ref: HubRef | str, registry=None, *, name: str | None = None, base: str | None = None,
         task: str | None = None, endpoint: str | None = None, token: str | None = None,
         reporter: Reporter | None = None, expect=None) -> PullResult:
    """Download, verify and register ``ref``. ``expect`` (a ``lockfile.LockEntry``) pins the content."""
    from .registry import Registry

    rep = ensure(reporter)
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    registry = registry or Registry()
    client = HubClient(endpoint, token)
    commit = expect.commit if expect is not None else client.commit_of(ref)
    hit = _registered(registry, ref, commit, name)
    if hit is not None and (expect is None or hit.digest == expect.digest or not expect.digest):
        rep.info(f"{ref.cli()} at {commit[:10]} is already registered as {hit.ref}")
        return PullResult(hit, commit, bool(hit.provenance.get("verified")), True, hit.provenance.get("files") or {})
    tree = client.tree(ref, commit)
    if not tree:
        raise HubError(f"nothing found at {ref.cli()} (commit {commit[:10]})", where=client.endpoint,
                       hint="check the subfolder")
    wanted = _check_listing(ref, tree)
    registry.store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull.staging-", dir=registry.store) as tmp:
        dl = Path(tmp) / "dl"
        local = dl / ref.subfolder if ref.subfolder else dl
        if EXPERT_JSON in tree:
            files = _pull_bundle_files(client, ref, commit, tree, dl, local, rep)
            verified = True
        elif all(f in tree for f in ADAPTER_FILES):
            wanted = [r for r in wanted if r in (*ADAPTER_FILES, "README.md")]
            files = _download(client, ref, commit, wanted, dl, tree, rep)
            verified = False
        elif "moe_config.json" in tree:
            raise BundleError(f"{ref.cli()} is a composed checkpoint, not an expert", where=client.endpoint,
                              hint="download it with `hf download` and load it with `moemerge` commands for checkpoints")
        else:
            raise BundleError(f"{ref.cli()} holds no expert.json and no PEFT adapter "
                              f"({', '.join(ADAPTER_FILES)})", where=client.endpoint, hint="check the subfolder")
        for rel in files:
            if rel.endswith(".json"):
                from .hub import check_no_remote_code

                check_no_remote_code(local / rel, rel, where=ref.cli())
        if expect is not None and not expect.same_content(files):
            changed = sorted(r for r in set(files) | set(expect.files) if files.get(r, {}).get("sha256") != expect.files.get(r, {}).get("sha256"))
            raise IntegrityError(f"{ref.url()} at commit {commit[:10]} serves different content than the lock file "
                                 f"({', '.join(changed[:3])})", where=ref.url(),
                                 hint="run with --update to accept the new content")
        prov = _provenance(ref, commit, client, verified, files)
        bundle_dir = Path(tmp) / "bundle"
        if verified:
            _copy_files(local, bundle_dir, [*files])
        else:
            _bundle_from_plain(local, bundle_dir, ref, name=name, task=task, base=base, prov=prov, rep=rep)
        _check_base(bundle_dir, base, rep)
        entry = registry.add(bundle_dir, provenance=prov, name=name)
    if not verified:
        rep.warn(f"{ref.cli()} has no expert.json: registered as {entry.ref} with unverified provenance")
    return PullResult(entry, commit, verified, False, files)


def _pull_bundle_files(client, ref, commit, tree, dl, local, rep) -> dict[str, dict]:
    from .bundle import read_bundle
    from .hub import _refuse_kind

    if tree[EXPERT_JSON].size > MAX_EXPERT_JSON:
        raise UnsafeFileError(f"expert.json is {tree[EXPERT_JSON].size} bytes", where=ref.cli(), hint="refusing to parse it")
    first = _download(client, ref, commit, [EXPERT_JSON], dl, tree, rep)
    b = read_bundle(local)  # checks manifest paths (no '..', absolute, backslash) and digest
    for rel, rec in b.files.items():
        _refuse_kind(rel, f"{ref.cli()}/expert.json")
        if rel not in tree:
            raise IntegrityError(f"{rel} is in the manifest but not in the repo", where=f"{ref.cli()}/expert.json",
                                 hint="the upload is incomplete; ask the author to push again")
        if tree[rel].size != rec["size"]:
            raise IntegrityError(f"{rel} is listed with {tree[rel].size} bytes but the manifest says {rec['size']}",
                                 where=f"{ref.cli()}/expert.json", hint="nothing was downloaded")
    rest = _download(client, ref, commit, sorted(b.files), dl, tree, rep)
    b.verify()  # sha256 of every manifest file; names the first bad one
    return {**first, **rest}


def _copy_files(src: Path, dst: Path, rels: list[str]) -> None:
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)


def _bundle_from_plain(local: Path, out: Path, ref: HubRef, *, name, task, base, prov, rep) -> None:
    from .bundle import bundle_from_adapter
    from .modelcard import split_card

    card: dict = {}
    if (local / "README.md").is_file():
        try:
            card, _ = split_card((local / "README.md").read_text(encoding="utf-8", errors="replace"),
                                 where=f"{ref.cli()}/README.md")
        except Exception as exc:  # noqa: BLE001 - a hostile card only loses its metadata
            rep.warn(f"ignoring the model card of {ref.cli()}: {exc}")
    tags = [t for t in card.get("tags") or [] if isinstance(t, str)][:32] if isinstance(card.get("tags"), list) else []
    card_task = next((t[5:] for t in tags if t.startswith("task:")), None)
    default_name = _NAME_CLEAN.sub("-", (ref.subfolder.split("/")[-1] if ref.subfolder else ref.repo_id.split("/")[1]))
    extra = {"tags": tags}
    if isinstance(card.get("license"), str):
        extra["license"] = card["license"][:64]
    if isinstance(card.get("datasets"), list):
        extra["datasets"] = [d for d in card["datasets"] if isinstance(d, str)][:32]
    bundle_from_adapter(local, out, name=(name or default_name.strip("-._") or "expert")[:100],
                        task=task or card_task or "unknown", base=base, reporter=rep, provenance=prov,
                        description=f"Pulled from {ref.url()} (plain PEFT adapter, no expert.json).", **extra)


def _check_base(bundle_dir: Path, base: str | None, rep: Reporter) -> None:
    from .base import fingerprint_of
    from .bundle import read_bundle

    if not base:
        return
    meta = read_bundle(bundle_dir).meta
    fp = fingerprint_of(base)
    if not meta.base_fingerprint:
        rep.warn(f"{meta.name} records no base fingerprint: cannot check it against {base}")
    elif meta.base_fingerprint != fp:
        raise BaseMismatchError(f"{meta.name} was trained on {meta.base_model} (fingerprint {meta.base_fingerprint[:12]}), "
                                f"not on {base} ({fp[:12]})", where="--base", hint="pull it for the matching base model")


# ------------------------------------------------------------------------------------ compose + lock

def fetch_expert(ref: HubRef | str, registry, *, lock=None, update: bool = False, endpoint: str | None = None,
                 token: str | None = None, reporter: Reporter | None = None):
    """Registry entry for an ``hf://`` expert, honouring (and filling) ``lock``.

    With a lock entry and no ``update``: the reference must still resolve to the locked commit
    (or to one with identical files); the locked content is reused from the registry or pulled at
    the locked commit and checked byte for byte. Anything else raises ``IntegrityError`` naming
    the reference, with ``--update`` as the hint. With ``update`` (or no entry) the reference is
    resolved afresh and the lock entry is (re)written; call ``lock.save()`` afterwards.
    """
    from .lockfile import LockEntry

    rep = ensure(reporter)
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    locked = lock.get(ref) if lock is not None else None
    if locked is not None and not update:
        try:
            client = HubClient(endpoint, token)
            now = client.commit_of(ref)
        except HubError as exc:
            cached = _locked_copy(registry, locked)
            if cached is None or not ("offline" in exc.what or "cannot reach" in exc.what):
                raise
            rep.warn(f"{ref.url()}: {exc.what}; using the locked copy {cached.ref} (commit {locked.commit[:10]})")
            return cached
        if now != locked.commit and not _same_files(client.tree(ref, now), locked.files):
            raise IntegrityError(f"{ref.url()} now resolves to commit {now[:10]} with different content than the "
                                 f"locked commit {locked.commit[:10]}", where=str(lock.path),
                                 hint="run with --update to accept the new content, or pin the commit in the recipe")
        res = pull(ref, registry, endpoint=endpoint, token=token, reporter=rep, expect=locked)
        return res.entry
    res = pull(ref, registry, endpoint=endpoint, token=token, reporter=rep)
    if lock is not None:
        lock.set(ref, LockEntry(ref.repo_id, ref.revision, ref.subfolder, res.commit, res.files,
                                res.entry.digest, res.verified))
    return res.entry


def _locked_copy(registry, locked):
    """The registry entry holding exactly the locked bundle, if any (for offline runs)."""
    if not locked.digest:
        return None
    for e in registry.find():
        if e.digest == locked.digest and (e.provenance or {}).get("commit") == locked.commit and e.path.is_dir():
            return e
    return None


def _same_files(tree: dict[str, TreeFile], files: dict[str, dict]) -> bool:
    """True when the listing shows the locked files unchanged (sizes + LFS sha256 where listed)."""
    for rel, rec in files.items():
        tf = tree.get(rel)
        if tf is None or tf.size != rec["size"] or (tf.lfs_sha256 and tf.lfs_sha256 != rec["sha256"]):
            return False
        if not tf.lfs_sha256:
            return False  # a regular file's git id cannot be compared with a sha256 without downloading
    return True


# ------------------------------------------------------------------------------------------ search

@dataclass
class SearchHit:
    repo_id: str
    task: str
    base: str
    downloads: int
    last_modified: str
    tags: list


def search(query: str | None = None, *, task: str | None = None, base: str | None = None, all_lora: bool = False,
           limit: int = 50, endpoint: str | None = None, token: str | None = None) -> list[SearchHit]:
    """Hub models tagged ``moemerge`` (and with ``all_lora`` other PEFT repos), most downloaded first."""
    client = HubClient(endpoint, token)
    seen: dict[str, SearchHit] = {}
    for tag in ("moemerge", "peft") if all_lora else ("moemerge",):
        models = client.call(lambda t=tag: list(client.api.list_models(search=query or None, filter=t, limit=limit * 4,
                                                                       sort="downloads")),
                             what="search the Hub", retry=True)
        for m in models:
            tags = [t for t in (m.tags or []) if isinstance(t, str)]
            hit_task = next((t[5:] for t in tags if t.startswith("task:")), "")
            bases = [t.split(":")[-1] for t in tags if t.startswith("base_model:")]
            hit_base = bases[0] if bases else ""
            if task and hit_task != task:
                continue
            if base and base not in bases:
                continue
            lm = m.last_modified.strftime("%Y-%m-%d %H:%M") if getattr(m, "last_modified", None) else ""
            seen.setdefault(m.id, SearchHit(m.id, hit_task, hit_base, int(m.downloads or 0), lm, tags))
    return sorted(seen.values(), key=lambda h: (-h.downloads, h.repo_id))[:limit]



"""Hugging Face Hub: push, pull, search. The only module that talks to the network.

* ``push``   publishes a verified expert bundle (or a composed checkpoint) in one commit, with a
             refreshed model card; an unchanged bundle makes no commit.
* ``pull``   resolves ``org/repo[@rev][:subfolder]`` to a 40-hex commit SHA, refuses pickle and
             code files *before downloading anything*, downloads into a staging directory,
             verifies every byte (the tree's git/LFS object ids, then the bundle's sha256
             manifest), checks the base fingerprint, and registers the bundle pinned to the commit.
             A plain PEFT LoRA repo (no ``expert.json``) becomes a bundle marked unverified.
* ``fetch_expert`` is what ``compose`` calls for ``hf://`` experts, with a lock file.
* ``search`` lists Hub models tagged ``moemerge`` (optionally all PEFT LoRA repos).

huggingface_hub does not hash-check downloads: every check here is ours. Failures raise
``HubError`` / ``IntegrityError`` / ``UnsafeFileError`` with one line; a failed pull leaves
nothing behind (staging is deleted) and the registry unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BundleError, UnsafeFileError
from .hashing import sha256_file
from .hub_client import HubClient, glob_escape
from .progress import Reporter, ensure
from .refs import HubRef, parse_ref

#: what may be pushed or pulled; anything else (pickle, code, archives...) is refused by name
ALLOWED_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".md", ".txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".dill", ".h5")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib", ".sh", ".ipynb", ".js", ".exe")
#: git plumbing present in every Hub repo: never downloaded, never part of a bundle
SKIPPED_NAMES = frozenset({".gitattributes", ".gitignore"})
MAX_JSON_BYTES = 4 * 1024 * 1024


def file_kind_problem(rel: str) -> str | None:
    """Why ``rel`` may not be pushed/pulled, or None when its type is allowed."""
    low = rel.lower()
    if low.endswith(PICKLE_SUFFIXES):
        return "is a pickle-type file (loading it can run arbitrary code)"
    if low.endswith(CODE_SUFFIXES):
        return "is code"
    if not low.endswith(ALLOWED_SUFFIXES):
        return "has a file type that is not allowed"
    return None


def _refuse_kind(rel: str, where: str) -> None:
    problem = file_kind_problem(rel)
    if problem:
        raise UnsafeFileError(f"{rel} {problem}", where=where,
                              hint="only safetensors, JSON, YAML, Markdown and text files are pushed or pulled")


def check_no_remote_code(path: Path, rel: str, *, where: str | None = None) -> None:
    """Refuse JSON configs that ask for remote code (``auto_map``); read as plain JSON, never executed."""
    where = where or str(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UnsafeFileError(f"{rel} is larger than {MAX_JSON_BYTES // 1024 // 1024} MB", where=where)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{rel} is not valid JSON ({type(exc).__name__})", where=where) from exc
    if isinstance(data, dict) and data.get("auto_map"):
        raise UnsafeFileError(f"{rel} asks for remote code (auto_map)", where=where,
                              hint="mergekit-moe never runs code from a repo")


# ---------------------------------------------------------------------------------------------- push

@dataclass
class PushResult:
    repo_id: str
    revision: str
    subfolder: str
    kind: str          # "bundle" or "checkpoint"
    url: str           # web URL of the pushed folder
    commit: str        # 40-hex commit SHA now at the head of ``revision``
    changed: bool      # False when nothing differed (no commit was made)
    files: list[str] = field(default_factory=list)


def _push_source(source: str | os.PathLike, registry) -> tuple[str, Path]:
    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "expert.json").is_file():
            return "bundle", p
        if (p / "moe_config.json").is_file():
            return "checkpoint", p
        raise BundleError("neither an expert bundle (expert.json) nor a composed checkpoint (moe_config.json)",
                          where=str(p), hint="`moemerge import` a plain PEFT adapter first")
    from .registry import Registry

    return "bundle", (registry or Registry()).resolve(str(source)).path


def _stage_bundle(root: Path, stage: Path, ref: HubRef) -> tuple[list[str], object]:
    """Copy a verified bundle with a refreshed model card; expert.json is rewritten to match it."""
    from .atomic import dump_json
    from .bundle import EXPERT_JSON, README, _expert_json, read_bundle  # noqa: PLC2701 (one format, one writer)
    from .modelcard import render_card

    b = read_bundle(root)
    b.verify()  # refuse before any request: IntegrityError names the file
    for rel in b.files:
        _refuse_kind(rel, str(root))
    for rel in b.files:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(b.file(rel), dst)
    meta = type(b.meta)(**b.meta.to_dict())
    meta.provenance = {}  # local paths and pull records stay on this machine (not part of the digest)
    # the card is re-rendered from expert.json (a stale or hand-edited card is replaced); for a
    # current bundle it is byte-identical, so the bundle digest round-trips through the Hub
    (stage / README).write_text(render_card(meta), encoding="utf-8")
    files = dict(b.files)
    files[README] = {"sha256": sha256_file(stage / README), "size": (stage / README).stat().st_size}
    (stage / EXPERT_JSON).write_text(dump_json(_expert_json(meta, files)), encoding="utf-8")
    read_bundle(stage).verify()  # the staged copy is what the Hub will serve: it must verify too
    return sorted([*files, EXPERT_JSON]), meta


def hub_usage(ref: HubRef, meta) -> str:
    """The model-card section on using a pushed expert (deterministic: no dates)."""
    sub = f', subfolder="{ref.subfolder}"' if ref.subfolder else ""
    return "\n".join(["", "## Use it from the Hub", "", "```bash", f"moemerge pull {ref.cli()}", "```", "",
                      "```python", "from peft import PeftModel",
                      f'model = PeftModel.from_pretrained(base, "{ref.repo_id}"{sub})', "```", "",
                      f"In a compose recipe: `source: {ref.url()}`.", ""])


def _stage_checkpoint(root: Path, stage: Path) -> list[str]:
    from .checkpoint import CONFIG, verify_files

    table = verify_files(root)
    names = sorted({*table, CONFIG})
    for rel in names:
        _refuse_kind(rel, str(root))
        src = root / rel
        if src.is_symlink() or not src.is_file():
            raise UnsafeFileError(f"{rel} is not a regular file", where=str(root))
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, stage / rel)
    return names


def push(source: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, subfolder: str = "", endpoint: str | None = None, token: str | None = None,
         registry=None, reporter: Reporter | None = None) -> PushResult:
    """Publish a bundle (path or registry ref) or a composed checkpoint directory to ``repo_id``.

    Everything is checked and staged before the first request. The staging folder mirrors the
    repo (``<subfolder>/...``), so stale files of the pushed folder are deleted and, for a first
    push into a subfolder, a root model card (tags ``moemerge``...) is added in the same commit.
    """
    rep = ensure(reporter)
    ref = parse_ref(f"{repo_id}{'@' + revision if revision else ''}{':' + subfolder if subfolder else ''}")
    kind, root = _push_source(source, registry)
    with tempfile.TemporaryDirectory(prefix=".moemerge-push-") as tmp:
        stage = Path(tmp) / "upload"
        folder = stage / ref.subfolder if ref.subfolder else stage
        folder.mkdir(parents=True)
        if kind == "bundle":
            names, meta = _stage_bundle(root, folder, ref)
            label = f"{meta.name}@{meta.version}"
        else:
            names, meta, label = _stage_checkpoint(root, folder), None, root.name
        client = HubClient(endpoint, token)  # nothing was sent before this point
        rep.info(f"pushing {kind} {label} to {client.endpoint}/{ref.repo_id}")
        client.call(client.api.create_repo, ref.repo_id, private=private, exist_ok=True, what=f"create {ref.repo_id}")
        before, remote = _head(client, ref)
        if before is None and ref.rev != "main":
            _create_branch(client, ref, rep)
            before, remote = _head(client, ref)
        stale = _stale_files(ref, remote, set(names))
        if ref.subfolder and meta is not None and "README.md" not in remote:
            (stage / "README.md").write_text(root_card(ref, meta), encoding="utf-8")
        info = client.upload_folder(repo_id=ref.repo_id, folder_path=str(stage), revision=ref.rev,
                                    commit_message=message or f"moemerge push {kind} {label}",
                                    delete_patterns=[glob_escape(s) for s in stale] or None, warn=rep.warn)
    commit = str(info.oid)
    changed = commit != before
    if not changed:
        rep.info(f"{ref.cli()} already holds this {kind}: no new commit")
    tree = f"/tree/{ref.rev}/{ref.subfolder}" if (ref.subfolder or ref.rev != "main") else ""
    return PushResult(ref.repo_id, ref.rev, ref.subfolder, kind, f"{client.endpoint}/{ref.repo_id}{tree}".rstrip("/"),
                      commit, changed, names)


def _create_branch(client: HubClient, ref: HubRef, rep: Reporter) -> None:
    """Create ``ref.rev`` from main. A server without the branch API may still create it on commit."""
    from .errors import HubError

    try:
        client.call(client.api.create_branch, ref.repo_id, branch=ref.rev, exist_ok=True, what=f"create branch {ref.rev}")
    except HubError as exc:
        if not any(code in exc.what for code in ("HTTP 404", "HTTP 405", "HTTP 501")):
            raise
        rep.warn(f"the server could not create branch {ref.rev} ({exc.what}); committing to it directly")


def _head(client: HubClient, ref: HubRef) -> tuple[str | None, dict]:
    """Commit SHA at the head of the branch and the whole repo's files (None, {} for a repo without commits)."""
    from .errors import HubError

    try:
        before = client.commit_of(ref)
    except HubError as exc:
        # the real Hub always makes an initial commit; a minimal server may not: the upload creates it
        if "not found" in exc.what or "commit SHA" in exc.what:
            return None, {}
        raise
    try:
        return before, client.tree(HubRef(ref.repo_id, ref.revision), before, missing_ok=True)
    except HubError:
        return before, {"README.md": None}  # no listing: upload without deleting anything or adding a root card


def root_card(ref: HubRef, meta) -> str:
    """Card for the repo root when experts live in subfolders (the Hub reads tags from the root card only)."""
    import yaml

    from .modelcard import front_matter

    fm = yaml.safe_dump(front_matter(meta), sort_keys=False, allow_unicode=True).strip()
    return "\n".join([f"---\n{fm}\n---", "", f"# {ref.repo_id}", "",
                      "moemerge expert bundles, one per subfolder (each a PEFT LoRA adapter with `expert.json`).", "",
                      f"First expert: `{ref.subfolder}` ({meta.name}, task `{meta.task}`).", hub_usage(ref, meta)])


def _stale_files(ref: HubRef, remote: dict, names: set[str]) -> list[str]:
    """Repo paths of the pushed folder that the new upload no longer has (deleted in the same commit)."""
    pre = ref.subfolder + "/" if ref.subfolder else ""
    out = []
    for path in remote:
        if not path.startswith(pre):
            continue
        rel = path[len(pre):]
        if rel in names or rel.split("/")[-1] in SKIPPED_NAMES:
            continue
        if not ref.subfolder and "/" in rel:
            continue  # a root push never touches other folders of the repo
        out.append(path)
    return out


# ---------------------------------------------------- pull, fetch_expert, search live in hub_pull.py

from .hub_pull import PullResult, SearchHit, fetch_expert, pull, search  # noqa: E402  (public API of this module)

__all__ = ["push", "pull", "fetch_expert", "search", "PushResult", "PullResult", "SearchHit", "HubClient",
           "file_kind_problem", "check_no_remote_code", "hub_usage"]

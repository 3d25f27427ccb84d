"""A Hub-compatible HTTP server for offline end-to-end tests (standard library only).

It speaks enough of the Hugging Face Hub protocol for the *real* ``huggingface_hub`` client
(see /work/shared/HUB_API.md): repos with git-like commits, branches and tags, repo info,
tree listing, preupload, LFS batch + PUT, NDJSON commits, ``resolve`` downloads with
HEAD/GET/Range, whoami, create/delete repo, validate-yaml and model search.

Knobs for negative tests (all thread-safe):
  * ``tamper(repo_id, path)``     serve modified bytes (same length) on GET downloads
  * ``truncate(repo_id, path)``   close the connection after ``keep`` bytes of a download
  * ``fail_next(n, status)``      answer the next ``n`` matching requests with a 5xx
  * ``requests``                  log of ``(method, path)`` received, for "no request was sent"

Run standalone for manual experiments: ``python tests/hub_server.py --port 8765``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npy",
                ".npz", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".parquet", ".arrow")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Blob:
    """File content as stored in a commit; ``lfs`` files are reported with an ``lfs`` pointer."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def tree_oid(self) -> str:
        # git stores the pointer file for LFS blobs: the tree oid is the pointer's blob sha1
        p = self.pointer()
        return hashlib.sha1(b"blob %d\0" % len(p) + p).hexdigest() if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    id: str
    type: str
    owner: str
    private: bool
    created: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    downloads: int = 0

    def resolve(self, rev: str) -> Commit | None:
        rev = unquote(rev)
        for table in (self.branches, self.tags):
            if rev in table:
                return self.commits[table[rev]]
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                return self.resolve(rev[len(prefix):])
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [c for oid, c in self.commits.items() if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def head(self, branch: str = "main") -> Commit:
        return self.commits[self.branches[branch]]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


def parse_front_matter(readme: bytes, limit: int = 64 * 1024) -> dict:
    """YAML front matter of a model card, parsed with limits (a hostile card yields ``{}``)."""
    import yaml

    text = readme[:limit].decode("utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


class HubState:
    """All repos, tokens, LFS objects and test knobs; shared by the handler threads."""

    def __init__(self, tokens: dict[str, tuple[str, list[str]]], upload_mode: str, redirect_lfs: bool = False):
        self.tokens = tokens
        self.upload_mode = upload_mode  # "lfs": binary files go through LFS; "regular": everything inline
        self.redirect_lfs = redirect_lfs  # answer LFS downloads with a 302 to another origin, like the Hub's CDN
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.tampered: dict[tuple[str, str], Callable[[bytes], bytes]] = {}
        self.truncated: dict[tuple[str, str], list] = {}  # -> [keep_bytes, times_left or None]
        self.failures: list[list] = []  # [remaining, status, regex or None]
        self._counter = 0

    # ---- commits ----------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, Blob], title: str, message: str,
                   author: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.id, parent.oid if parent else None, sorted((p, b.git_oid) for p, b in files.items()),
                           title, self._counter, time.time_ns()])
        c = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.oid if parent else None, files, title, message,
                   author, _now())
        repo.commits[c.oid] = c
        return c

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        if self.upload_mode != "lfs" or size == 0:
            return False
        return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample

    # ---- knobs ------------------------------------------------------------------------
    def should_fail(self, method: str, path: str) -> int | None:
        with self.lock:
            for f in self.failures:
                if f[0] > 0 and (f[2] is None or re.search(f[2], f"{method} {path}")):
                    f[0] -= 1
                    return f[1]
        return None


class HubServer:
    """Start/stop wrapper with the test knobs. ``url`` is the endpoint to give the client."""

    def __init__(self, *, tokens: dict[str, tuple[str, list[str]]] | None = None, upload_mode: str = "lfs",
                 redirect_lfs: bool = False, host: str = "127.0.0.1", port: int = 0):
        self.state = HubState(tokens or {"hf_test_write": ("alice", ["medorg"]), "hf_test_bob": ("bob", [])},
                              upload_mode, redirect_lfs)
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- knobs and inspection ------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.state.requests

    def tamper(self, repo_id: str, path: str, fn: Callable[[bytes], bytes] | None = None) -> None:
        """Serve ``fn(bytes)`` (default: flip one byte in the middle, same length) on GET."""
        def flip(data: bytes) -> bytes:
            i = len(data) // 2
            return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        self.state.tampered[(repo_id, path)] = fn or flip

    def truncate(self, repo_id: str, path: str, keep: int = 64, times: int | None = None) -> None:
        """Close the connection after ``keep`` bytes of each GET of ``path`` (``times`` GETs, None = always)."""
        self.state.truncated[(repo_id, path)] = [keep, times]

    def fail_next(self, n: int, status: int = 500, match: str | None = None) -> None:
        """Answer the next ``n`` requests whose ``"METHOD /path"`` matches ``match`` with ``status``."""
        with self.state.lock:
            self.state.failures.append([n, status, match])

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        repo = self.repo(repo_id)
        n, c = 0, repo.head(branch)
        while c is not None:
            n += 1
            c = repo.commits.get(c.parent) if c.parent else None
        return n

    def put_files(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", title: str = "test commit",
                  owner: str = "alice", delete: tuple[str, ...] = ()) -> str:
        """Commit files directly (no client), e.g. to plant a ``.bin`` or a hostile card. Returns the commit oid."""
        st = self.state
        with st.lock:
            key = ("model", repo_id)
            if key not in st.repos:
                _create_repo(st, repo_id, "model", owner, False)
            repo = st.repos[key]
            parent = repo.head(branch) if branch in repo.branches else repo.head("main")
            new = dict(parent.files)
            for p in delete:
                new.pop(p, None)
            for p, data in files.items():
                new[p] = Blob(data, st.is_lfs(p, len(data), data[:512]))
            c = st.new_commit(repo, parent, new, title, "", owner)
            repo.branches[branch] = c.oid
            return c.oid


def _create_repo(st: HubState, repo_id: str, rtype: str, owner: str, private: bool) -> Repo:
    repo = Repo(repo_id, rtype, owner, private)
    c = st.new_commit(repo, None, {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit", "", owner)
    repo.branches["main"] = c.oid
    st.repos[(rtype, repo_id)] = repo
    return repo


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has a Content-Length

    def log_message(self, fmt, *args) -> None:  # quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------
    def _read_body(self) -> bytes:
        # Always drain the body: an unread body corrupts the next keep-alive request.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json(e.status, e.body or {"error": e.message}, headers)

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"

    def _user(self, required: bool = False) -> tuple[str, list[str]] | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            tok = auth[7:].strip()
            if tok not in self.state.tokens:
                raise HubError(401, "Invalid credentials in Authorization header", None,
                               {"error": "Invalid username or password."})
            return self.state.tokens[tok]
        if required:
            raise HubError(401, "You must be authenticated to do this", None)
        return None

    def _can_write(self, user, repo_id: str) -> None:
        ns = repo_id.split("/")[0]
        if user is None:
            raise HubError(401, "You must be authenticated to do this")
        if ns != user[0] and ns not in user[1]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")

    def _repo(self, rtype: str, repo_id: str, user, write: bool = False) -> Repo:
        repo = self.state.repos.get((rtype, repo_id))
        if repo is None or (repo.private and (user is None or (repo.owner != user[0] and repo_id.split("/")[0] not in user[1]))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._can_write(user, repo_id)
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return c

    # ---- dispatch ----------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    ROUTES = [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "harnesses"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", r"^/api/models$", "search"),
        ("ANY", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/xet-(read|write)-token/.*$", "xet"),
        ("GET", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$", "info"),
        ("GET", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
        ("POST", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/paths-info/(?P<rev>[^/]+)$", "paths_info"),
        ("GET", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/refs$", "refs"),
        ("GET", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/commits/(?P<rev>[^/]+)$", "commits"),
        ("POST", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("POST", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/branch/(?P<branch>[^/]+)$", "create_branch"),
        ("POST", rf"^/api/(?P<t>models|datasets|spaces)/{_REPO}/tag/(?P<rev>[^/]+)$", "create_tag"),
        ("POST", rf"^/(?:(?P<t>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        ("GETHEAD", r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$", "lfs_get"),
        ("GETHEAD", rf"^/(?:(?P<t>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]

    def _dispatch(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        path = url.path
        with self.state.lock:
            self.state.requests.append((self.command, path))
        try:
            status = self.state.should_fail(self.command, path)
            if status is not None:
                raise HubError(status, "Injected server error")
            for method, pattern, name in self.ROUTES:
                if method == "ANY" or self.command == method or (method == "GETHEAD" and self.command in ("GET", "HEAD")):
                    m = re.match(pattern, path)
                    if m:
                        getattr(self, "r_" + name)(body, **{k: v for k, v in m.groupdict().items()})
                        return
            raise HubError(404, f"no route for {self.command} {path}")
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in the test server: make it visible to the client
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    @staticmethod
    def _rid(ns: str, name: str) -> str:
        return f"{unquote(ns)}/{unquote(name)}"

    @staticmethod
    def _rtype(t: str | None) -> str:
        return REPO_TYPES.get(t or "models", "model")

    # ---- account and repos ----------------------------------------------------------------
    def r_whoami(self, body):
        user = self._user(required=True)
        self._json(200, {"type": "user", "name": user[0], "fullname": user[0], "email": None,
                         "orgs": [{"name": o, "type": "org"} for o in user[1]],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def r_harnesses(self, body):
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def r_xet(self, body, **_):
        raise HubError(501, "Xet is not available on this test server")

    def r_create_repo(self, body):
        user = self._user(required=True)
        p = json.loads(body or b"{}")
        rtype = p.get("type") or "model"
        repo_id = f"{p.get('organization') or user[0]}/{p['name']}"
        self._can_write(user, repo_id)
        url = f"{self.base}/{'' if rtype == 'model' else rtype + 's/'}{repo_id}"
        with self.state.lock:
            if (rtype, repo_id) in self.state.repos:
                self._json(409, {"error": "You already created this model repo", "url": url},
                           {"X-Error-Message": "You already created this model repo"})
                return
            private = p.get("private") or p.get("visibility") == "private"
            _create_repo(self.state, repo_id, rtype, user[0], bool(private))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def r_delete_repo(self, body):
        user = self._user(required=True)
        p = json.loads(body or b"{}")
        repo_id = f"{p.get('organization') or user[0]}/{p['name']}"
        with self.state.lock:
            self._repo(p.get("type") or "model", repo_id, user, write=True)
            del self.state.repos[(p.get("type") or "model", repo_id)]
        self._json(200, {})

    def r_validate_yaml(self, body):
        p = json.loads(body or b"{}")
        content = (p.get("content") or "").encode()
        m = re.match(rb"^---\s*\n(.*?)\n---", content, re.S)
        if m:
            import yaml
            try:
                data = yaml.safe_load(m.group(1)[:64 * 1024])
            except Exception as e:
                self._json(400, {"errors": [{"message": f"Invalid YAML: {str(e).splitlines()[0]}"}], "warnings": []})
                return
            if data is not None and not isinstance(data, dict):
                self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
                return
        self._json(200, {"errors": [], "warnings": []})

    # ---- reading ------------------------------------------------------------------------
    def _card(self, commit: Commit) -> dict:
        readme = commit.files.get("README.md")
        return parse_front_matter(readme.data) if readme else {}

    def _tags(self, card: dict) -> list[str]:
        tags = [t for t in (card.get("tags") or []) if isinstance(t, str)] if isinstance(card.get("tags"), list) else []
        for key, prefix in (("library_name", ""), ("license", "license:"), ("base_model", "base_model:")):
            vals = card.get(key)
            for v in (vals if isinstance(vals, list) else [vals]):
                if isinstance(v, str):
                    tags.append(prefix + v)
        for d in card.get("datasets") or [] if isinstance(card.get("datasets"), list) else []:
            if isinstance(d, str):
                tags.append("dataset:" + d)
        return list(dict.fromkeys(tags))

    def _info(self, repo: Repo, commit: Commit, with_sizes: bool) -> dict:
        card = self._card(commit)
        siblings = [{"rfilename": p, **({"size": len(b.data)} if with_sizes else {})} for p, b in sorted(commit.files.items())]
        return {"_id": hashlib.md5(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
                "author": repo.id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
                "createdAt": repo.created, "private": repo.private, "disabled": False, "gated": False,
                "downloads": repo.downloads, "likes": 0, "tags": self._tags(card),
                "library_name": card.get("library_name") if isinstance(card.get("library_name"), str) else None,
                "pipeline_tag": card.get("pipeline_tag") if isinstance(card.get("pipeline_tag"), str) else None,
                "cardData": card, "siblings": siblings, "spaces": [],
                "usedStorage": sum(len(b.data) for b in commit.files.values())}

    def r_info(self, body, t, ns, name, rev=None):
        user = self._user()
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user)
            commit = self._commit(repo, rev or "main")
            info = self._info(repo, commit, "blobs" in self.query)
        self._json(200, info)

    def _entry(self, path: str, blob: Blob) -> dict:
        e = {"type": "file", "path": path, "oid": blob.tree_oid, "size": len(blob.data)}
        if blob.lfs:
            e["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer())}
        return e

    def r_tree(self, body, t, ns, name, rev, path=None):
        user = self._user()
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user)
            commit = self._commit(repo, rev)
            prefix = unquote(path or "").strip("/")
            if prefix in commit.files:
                self._json(200, [self._entry(prefix, commit.files[prefix])])
                return
            pre = prefix + "/" if prefix else ""
            out, dirs = [], set()
            for p, blob in sorted(commit.files.items()):
                if not p.startswith(pre):
                    continue
                rest = p[len(pre):].split("/")
                for i in range(1, len(rest)):
                    if recursive or i == 1:
                        dirs.add(pre + "/".join(rest[:i]))
                if recursive or len(rest) == 1:
                    out.append(self._entry(p, blob))
            if prefix and not out and not dirs:
                raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
            out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                    for d in sorted(dirs)]
        self._json(200, out)

    def r_paths_info(self, body, t, ns, name, rev):
        user = self._user()
        paths = json.loads(body or b"{}").get("paths") or []
        with self.state.lock:
            commit = self._commit(self._repo(self._rtype(t), self._rid(ns, name), user), rev)
            out = [self._entry(p, commit.files[p]) for p in paths if p in commit.files]
        self._json(200, out)

    def r_refs(self, body, t, ns, name):
        user = self._user()
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user)
            ref = lambda kind, n, oid: {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid}  # noqa: E731
            out = {"branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                   "tags": [ref("tags", n, o) for n, o in repo.tags.items()], "converts": [], "pullRequests": []}
        self._json(200, out)

    def r_commits(self, body, t, ns, name, rev):
        user = self._user()
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user)
            c, out = self._commit(repo, rev), []
            while c is not None:
                out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                            "authors": [{"user": c.author}]})
                c = repo.commits.get(c.parent) if c.parent else None
        self._json(200, out)

    def r_resolve(self, body, t, ns, name, rev, path):
        user = self._user()
        repo_id, path = self._rid(ns, name), unquote(path)
        st = self.state
        with st.lock:
            repo = self._repo(self._rtype(t), repo_id, user)
            commit = self._commit(repo, rev)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            if self.command == "GET" and "Range" not in self.headers:
                repo.downloads += 1
            tamper = st.tampered.get((repo_id, path))
            trunc = st.truncated.get((repo_id, path))
            if trunc is not None and self.command == "GET":
                if trunc[1] is not None:
                    trunc[1] -= 1
                    if trunc[1] < 0:
                        trunc = None
        data = tamper(blob.data) if (tamper and self.command == "GET") else blob.data
        etag = f'"{blob.sha256 if blob.lfs else blob.git_oid}"'
        if blob.lfs and st.redirect_lfs:
            # the Hub sends LFS content from a CDN on another origin (the client drops Authorization there)
            with st.lock:
                st.lfs_objects.setdefault(blob.sha256, blob.data)
            cdn = f"http://localhost:{self.server.server_address[1]}/lfs-objects/{blob.sha256}"
            self._send(302, b"", {"Location": cdn, "X-Repo-Commit": commit.oid, "ETag": etag, "X-Linked-Etag": etag,
                                  "X-Linked-Size": len(blob.data)}, "text/plain")
            return
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": len(blob.data)})
        status, start = 200, 0
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers}, "application/octet-stream")
                return
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start:end + 1], 206
        if trunc is not None and self.command == "GET":
            # promise the full length, send a prefix, then drop the connection
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/octet-stream", "Content-Length": len(data)}.items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(data[:trunc[0]])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, data, headers, "application/octet-stream")

    def r_search(self, body):
        user = self._user()
        q = self.query
        search = (q.get("search") or [""])[0].lower()
        author = (q.get("author") or [None])[0]
        filters = [f for v in q.get("filter", []) for f in v.split(",") if f]
        limit = int((q.get("limit") or ["1000"])[0])
        sort = (q.get("sort") or [None])[0]
        out = []
        with self.state.lock:
            for (rtype, rid), repo in self.state.repos.items():
                if rtype != "model" or (repo.private and (user is None or user[0] != repo.owner)):
                    continue
                if search and search not in rid.lower():
                    continue
                if author and rid.split("/")[0] != author:
                    continue
                info = self._info(repo, repo.head(), False)
                if any(f not in info["tags"] and f != info["library_name"] for f in filters):
                    continue
                if "cardData" not in q and "full" not in q:
                    info.pop("cardData")
                info.pop("siblings")
                out.append(info)
        if sort in ("downloads", "lastModified", "createdAt", "likes"):
            out.sort(key=lambda i: i.get(sort) or 0, reverse=True)
        self._json(200, out[:limit])

    # ---- writing ------------------------------------------------------------------------
    def r_create_branch(self, body, t, ns, name, branch):
        user = self._user(required=True)
        p = json.loads(body or b"{}")
        branch = unquote(branch)
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user, write=True)
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            repo.branches[branch] = self._commit(repo, p.get("startingPoint") or "main").oid
        self._json(200, {})

    def r_create_tag(self, body, t, ns, name, rev):
        user = self._user(required=True)
        p = json.loads(body or b"{}")
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user, write=True)
            if p["tag"] in repo.tags:
                raise HubError(409, f"Tag {p['tag']} already exists")
            repo.tags[p["tag"]] = self._commit(repo, rev).oid
        self._json(200, {})

    def r_preupload(self, body, t, ns, name, rev):
        user = self._user(required=True)
        files = json.loads(body or b"{}").get("files") or []
        out = []
        with self.state.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user, write=True)
            commit = repo.resolve(rev) or repo.head()
            for f in files:
                lfs = self.state.is_lfs(f["path"], int(f["size"]), base64.b64decode(f.get("sample") or ""))
                old = commit.files.get(f["path"])
                oid = (old.sha256 if lfs else old.git_oid) if old else None
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._json(200, {"files": out, "commitOid": commit.oid})

    def r_lfs_batch(self, body, t, ns, name):
        user = self._user(required=True)
        p = json.loads(body or b"{}")
        with self.state.lock:
            self._repo(self._rtype(t), self._rid(ns, name), user, write=True)
            objs = []
            for o in p.get("objects") or []:
                entry = {"oid": o["oid"], "size": int(o["size"]), "authenticated": True}
                if o["oid"] not in self.state.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{self.base}/lfs-objects/{o['oid']}", "expires_in": 3600}}
                objs.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objs, "hash_algo": "sha256"}).encode(),
                   ctype="application/vnd.git-lfs+json")

    def r_lfs_put(self, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        with self.state.lock:
            self.state.lfs_objects[oid] = body
        self._send(200, b"", ctype="text/plain")

    def r_lfs_get(self, body, oid):
        if self.headers.get("Authorization"):
            raise HubError(400, "the CDN must not receive the Hub token")
        with self.state.lock:
            data = self.state.lfs_objects.get(oid)
        if data is None:
            raise HubError(404, "no such LFS object")
        self._send(200, data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}, "application/octet-stream")

    def r_commit(self, body, t, ns, name, rev):
        user = self._user(required=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        branch = unquote(rev)
        st = self.state
        with st.lock:
            repo = self._repo(self._rtype(t), self._rid(ns, name), user, write=True)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = repo.head(branch)
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, v = line.get("key"), line.get("value") or {}
                path = v.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"invalid path {path!r}")
                if key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    files[path] = Blob(data, False)
                elif key == "lfsFile":
                    if v["oid"] not in st.lfs_objects:
                        raise HubError(422, f"LFS object {v['oid']} for {path} was never uploaded")
                    files[path] = Blob(st.lfs_objects[v["oid"]], True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    pre = path.rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(pre)}
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            c = st.new_commit(repo, parent, files, header.get("summary") or "", header.get("description") or "",
                              user[0])
            repo.branches[branch] = c.oid
        prefix = "" if repo.type == "model" else repo.type + "s/"
        self._json(200, {"success": True, "commitOid": c.oid, "commitUrl": f"{self.base}/{prefix}{repo.id}/commit/{c.oid}",
                         "hookOutput": "", "pullRequestUrl": None})


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--upload-mode", choices=["lfs", "regular"], default="lfs")
    ap.add_argument("--org", action="append", default=[], metavar="NAME",
                    help="another organisation the write token's user (alice) may push to, besides medorg (repeatable)")
    args = ap.parse_args()
    tokens = {"hf_test_write": ("alice", ["medorg", *args.org]), "hf_test_bob": ("bob", [])}
    srv = HubServer(port=args.port, upload_mode=args.upload_mode, tokens=tokens)
    print(f"serving on {srv.url}; tokens: {', '.join(srv.state.tokens)}", flush=True)
    srv.httpd.serve_forever()


if __name__ == "__main__":
    main()

__all__ = ["HubServer", "Blob", "parse_front_matter", "quote"]

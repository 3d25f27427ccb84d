"""A thin wrapper over ``huggingface_hub.HfApi``: endpoint/token, retries with backoff, one-line errors.

Token handling is huggingface_hub's own: an explicit ``token``, else ``HF_TOKEN``, else the token
file written by ``hf auth login`` under ``HF_HOME``. The endpoint is ``--endpoint``, else
``HF_ENDPOINT``, else the public Hub. Server errors (5xx, 429) and dropped connections are retried
``MOEMERGE_HUB_RETRIES`` times (default 3) with exponential backoff starting at
``MOEMERGE_HUB_BACKOFF`` seconds (default 1.0); client errors (4xx) are never retried.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import HubError
from .refs import COMMIT_RE, HubRef

_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "RemoteProtocolError", "ReadError", "WriteError", "NetworkError", "ConnectionError")


def glob_escape(name: str) -> str:
    """Escape a file name for huggingface_hub's fnmatch patterns (``[``, ``*``, ``?`` are literal)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


@dataclass
class TreeFile:
    """One remote file at a commit: size, git blob id and (for LFS files) the sha256 of the content."""

    path: str
    size: int
    blob_id: str | None
    lfs_sha256: str | None


class HubClient:
    """``HfApi`` bound to an endpoint and token, with retries and typed one-line errors."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, *, retries: int | None = None,
                 backoff_s: float | None = None):
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise HubError("offline mode is on (HF_HUB_OFFLINE=1)", where="environment",
                           hint="unset HF_HUB_OFFLINE (or set it to 0) to talk to the Hub")
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.retries = int(os.environ.get("MOEMERGE_HUB_RETRIES", "3")) if retries is None else retries
        self.backoff_s = float(os.environ.get("MOEMERGE_HUB_BACKOFF", "1.0")) if backoff_s is None else backoff_s

    # -- calls --------------------------------------------------------------------------------
    def call(self, fn: Callable, *args, what: str, retry: bool = True, retry_network: bool = True,
             ctx: dict | None = None, **kwargs) -> Any:
        """Run ``fn``; retry transient failures; turn library errors into one-line ``HubError``s.

        ``retry_network=False`` retries server errors only (downloads resume dropped connections
        themselves). ``ctx`` (repo_id, revision, path) names what the error is about when ``fn``'s own
        arguments do not say it (e.g. a lambda).
        """
        ctx = ctx or {}
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised typed
                transient = _is_transient(exc) and (retry_network or _status(exc) is not None)
                if retry and transient and attempt < self.retries:
                    time.sleep(self.backoff_s * (2 ** attempt))
                    attempt += 1
                    continue
                raise self.error(exc, what=what, repo_id=ctx.get("repo_id") or _arg(args, kwargs, "repo_id"),
                                 revision=ctx.get("revision") or kwargs.get("revision"), path=ctx.get("path"),
                                 attempts=attempt + 1) from exc

    def error(self, exc: Exception, *, what: str, repo_id: str | None, revision: str | None, path: str | None,
              attempts: int = 1) -> Exception:
        from huggingface_hub import errors as e

        if isinstance(exc, HubError):
            return exc
        where = self.endpoint
        status = _status(exc)
        if isinstance(exc, e.OfflineModeIsEnabled):
            return HubError("offline mode is on (HF_HUB_OFFLINE=1)", where=what, hint="unset HF_HUB_OFFLINE to use the Hub")
        if isinstance(exc, e.RevisionNotFoundError):
            return HubError(f"revision {revision!r} not found in {repo_id}", where=where,
                            hint="check the branch, tag or commit SHA")
        if isinstance(exc, e.RemoteEntryNotFoundError):
            return HubError(f"{path or 'file'} not found in {repo_id}@{revision or 'main'}", where=where,
                            hint="check the subfolder and file names (`moemerge search`, the repo page)")
        if status == 401 and "Invalid credentials" in (exc.response.headers.get("X-Error-Message") or ""):
            return HubError("the Hub rejected the token (401 invalid credentials)", where=where,
                            hint="set a valid HF_TOKEN or run `hf auth login`")
        if isinstance(exc, e.RepositoryNotFoundError):
            return HubError(f"repo {repo_id} not found (or not visible with this token)", where=where,
                            hint="check the name; for a private repo set HF_TOKEN or run `hf auth login`")
        if status == 401:
            return HubError(f"{what}: authentication required (401)", where=where,
                            hint="set HF_TOKEN or run `hf auth login`")
        if status == 403:
            return HubError(f"{what}: permission denied (403)", where=where,
                            hint="the token needs write access to this namespace")
        if status is not None and status >= 500:
            return HubError(f"{what}: the Hub answered {status} after {attempts} attempt(s)", where=where,
                            hint="the server has a problem; try again later")
        if status is not None:
            return HubError(f"{what}: HTTP {status} {_first_line(exc)}", where=where)
        if _is_network(exc) and what.startswith("download"):
            return HubError(f"{what[len('download '):]}: the download was interrupted ({_first_line(exc)})", where=where,
                            hint="nothing was kept or registered; pull again")
        if _is_network(exc) or isinstance(exc, e.LocalEntryNotFoundError):
            return HubError(f"{what}: cannot reach the Hub ({type(exc).__name__}: {_first_line(exc)})", where=where,
                            hint="check the network and --endpoint/HF_ENDPOINT; set HF_HUB_OFFLINE=1 to work offline "
                                 "with experts already in the registry")
        return HubError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", where=where)

    # -- helpers used by push and pull -------------------------------------------------------------
    def commit_of(self, ref: HubRef) -> str:
        """The 40-hex commit SHA that ``ref``'s revision points to now."""
        info = self.call(self.api.repo_info, ref.repo_id, revision=ref.rev, what=f"resolve {ref.cli()}")
        sha = getattr(info, "sha", None)
        if not isinstance(sha, str) or not COMMIT_RE.match(sha):
            raise HubError(f"the Hub did not return a commit SHA for {ref.cli()} (got {sha!r})", where=self.endpoint)
        return sha

    def tree(self, ref: HubRef, commit: str, *, missing_ok: bool = False) -> dict[str, TreeFile]:
        """Files under ``ref.subfolder`` at ``commit`` (recursive), keyed by path relative to the subfolder.

        A missing subfolder is an error, or an empty listing with ``missing_ok`` (a first push).
        """
        from huggingface_hub.errors import RemoteEntryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        def listing() -> list:
            try:
                return list(self.api.list_repo_tree(ref.repo_id, path_in_repo=ref.subfolder or None, recursive=True,
                                                    revision=commit))
            except RemoteEntryNotFoundError:
                if missing_ok:
                    return []
                raise

        items = self.call(listing, what=f"list files of {ref.cli()}",
                          ctx={"repo_id": ref.repo_id, "revision": commit, "path": ref.subfolder or None})
        pre = ref.subfolder + "/" if ref.subfolder else ""
        out: dict[str, TreeFile] = {}
        for it in items:
            if not isinstance(it, RepoFile) or not it.path.startswith(pre):
                continue
            lfs = getattr(it, "lfs", None)
            out[it.path[len(pre):]] = TreeFile(it.path, int(it.size), getattr(it, "blob_id", None),
                                               getattr(lfs, "sha256", None) if lfs is not None else None)
        return out

    def upload_folder(self, *, warn: Callable[[str], None] | None = None, **kwargs) -> Any:
        """``HfApi.upload_folder`` as one commit (never retried: a commit is not idempotent).

        huggingface_hub uploads large files through Xet whenever ``hf_xet`` is installed, with no
        fallback. A self-hosted Hub-compatible server that only speaks classic LFS answers the
        Xet token request with 404/405/501; then the upload is redone once with Xet disabled
        (nothing was committed by the failed attempt).
        """
        what = f"upload to {kwargs.get('repo_id')}"
        try:
            return self.call(self.api.upload_folder, what=what, retry=False, **kwargs)
        except HubError as exc:
            if not _xet_unsupported(exc):
                raise
        if warn:
            warn(f"{self.endpoint} does not support Xet uploads; uploading with classic LFS instead")
        with xet_disabled():
            return self.call(self.api.upload_folder, what=what, retry=False, **kwargs)

    def download(self, ref: HubRef, commit: str, rel: str, local_dir: str) -> str:
        """Download one file at ``commit`` into ``local_dir`` (keeps the repo layout). Returns its path."""
        from huggingface_hub import hf_hub_download

        filename = f"{ref.subfolder}/{rel}" if ref.subfolder else rel
        return self.call(hf_hub_download, ref.repo_id, filename=filename, revision=commit, local_dir=local_dir,
                         endpoint=self.endpoint, token=self.token, what=f"download {filename}",
                         retry_network=False, ctx={"path": filename})


@contextlib.contextmanager
def xet_disabled() -> Iterator[None]:
    """Turn huggingface_hub's Xet transfers off inside the block (the flag is read at each upload)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = old


def _xet_unsupported(exc: HubError) -> bool:
    """The server refused the Xet token endpoint: it has no Xet storage (only classic LFS)."""
    text = str(exc)
    return "xet-write-token" in text and any(code in text for code in ("404", "405", "501", "Not Implemented"))


def _arg(args: tuple, kwargs: dict, name: str) -> str | None:
    if name in kwargs:
        return kwargs[name]
    return args[0] if args and isinstance(args[0], str) else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _is_network(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 5:
        if type(exc).__name__ in _NETWORK_ERRORS or isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(exc: Exception) -> bool:
    if type(exc).__name__ == "OfflineModeIsEnabled":
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status == 429
    return _is_network(exc)

"""References to Hub experts: ``org/repo[@rev][:subfolder]`` and ``hf://org/repo[@rev][/subfolder]``.

Two spellings name the same thing:

* CLI form (``moemerge pull``): ``org/repo``, ``org/repo@v2``, ``org/repo@main:experts/dx``,
  ``org/repo:experts/dx`` (the subfolder follows a colon);
* URL form (recipes, lock files): ``hf://org/repo``, ``hf://org/repo@v2:experts/dx``; without a
  revision the subfolder may also follow as a path (``hf://org/repo/experts/dx``).

A revision is a branch, a tag or a commit SHA; ``None`` means the default branch (``main``).
Subfolders are plain relative POSIX paths: ``..``, absolute paths, backslashes and empty
components are refused, so a reference can never point outside the repo folder it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from .errors import UnsafeFileError, UsageError

HF_SCHEME = "hf://"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_RE = re.compile(rf"^{_PART}/{_PART}$")
_REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A resolved-by-name pointer into a Hub repo: ``repo_id``, optional ``revision`` and ``subfolder``."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @property
    def rev(self) -> str:
        """The revision to ask for (``main`` when none was given)."""
        return self.revision or "main"

    @property
    def pinned(self) -> bool:
        """True when the revision is a full commit SHA (content cannot move under it)."""
        return bool(self.revision and COMMIT_RE.match(self.revision))

    def url(self, *, with_revision: bool = True) -> str:
        """Canonical ``hf://`` form (what provenance and lock files store)."""
        s = HF_SCHEME + self.repo_id
        if with_revision and self.revision:
            s += "@" + self.revision
        return s + (f":{self.subfolder}" if self.subfolder else "")

    def cli(self) -> str:
        """``org/repo[@rev][:sub]`` (what ``moemerge pull`` accepts)."""
        s = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return s + (f":{self.subfolder}" if self.subfolder else "")

    def at(self, revision: str | None) -> "HubRef":
        return HubRef(self.repo_id, revision, self.subfolder)

    def __str__(self) -> str:
        return self.url()


def check_subfolder(sub: str, *, where: str = "subfolder") -> str:
    """Normalize a subfolder (strip surrounding slashes) and refuse anything that could escape the repo."""
    sub = (sub or "").strip()
    if not sub:
        return ""
    if sub.startswith("/") or "\\" in sub or "\x00" in sub or re.match(r"^[A-Za-z]:", sub):
        raise UnsafeFileError(f"subfolder {sub!r} is not a relative path", where=where,
                              hint="write it as folder/inside/the/repo")
    sub = sub.rstrip("/")
    parts = sub.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeFileError(f"subfolder {sub!r} has empty, '.' or '..' components", where=where,
                              hint="write it as folder/inside/the/repo")
    return sub


def _check_repo(repo_id: str, text: str) -> str:
    if not _REPO_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"{text!r} does not name a Hub repo", where="reference",
                         hint="use org/repo[@revision][:subfolder], e.g. medorg/dx-expert@main:experts/dx")
    return repo_id


def _check_rev(rev: str, text: str) -> str:
    if not _REV_RE.match(rev) or ".." in rev or rev.endswith(("/", ".lock")):
        raise UsageError(f"bad revision {rev!r} in {text!r}", where="reference",
                         hint="a revision is a branch, a tag or a 40-hex commit SHA")
    return rev


def parse_ref(text: str) -> HubRef:
    """Parse either spelling (``hf://...`` or ``org/repo[@rev][:sub]``) into a :class:`HubRef`."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty Hub reference", hint="use org/repo[@revision][:subfolder]")
    s = text.strip()
    if s.startswith(HF_SCHEME):
        return _parse_url(s)
    head, sep, sub = s.partition(":")
    repo_id, at, rev = head.partition("@")
    ref = HubRef(_check_repo(repo_id, text), _check_rev(rev, text) if at else None,
                 check_subfolder(sub, where=f"reference {text!r}") if sep else "")
    if at and not rev:
        raise UsageError(f"empty revision after '@' in {text!r}", where="reference")
    return ref


def _parse_url(s: str) -> HubRef:
    body = s[len(HF_SCHEME):]
    if body.startswith(("datasets/", "spaces/")):
        raise UsageError(f"{s!r} is not a model repo", where="reference", hint="experts live in model repos")
    if body.startswith("models/"):
        body = body[len("models/"):]
    body, colon, colon_sub = body.partition(":")
    m = re.match(r"^(?P<ns>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^:]*))?(?:/(?P<sub>.*))?$", body)
    if not m or (m.group("rev") is not None and m.group("sub") is not None):
        raise UsageError(f"{s!r} is not a Hub reference", where="reference",
                         hint="use hf://org/repo[@revision][:subfolder]")
    if m.group("sub") is not None and colon:
        raise UsageError(f"{s!r} gives the subfolder twice", where="reference")
    rev = m.group("rev")
    if rev is not None and not rev:
        raise UsageError(f"empty revision after '@' in {s!r}", where="reference")
    revision = _check_rev(unquote(rev), s) if rev else None
    sub = m.group("sub") if m.group("sub") is not None else colon_sub
    return HubRef(_check_repo(f"{m.group('ns')}/{m.group('name')}", s), revision, check_subfolder(sub, where=f"reference {s!r}"))


def is_hub_ref(text: str) -> bool:
    """True for ``hf://...`` strings (recipes use this to tell Hub experts from registry names)."""
    return isinstance(text, str) and text.strip().startswith(HF_SCHEME)

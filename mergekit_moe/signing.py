"""Optional bundle signatures with a local key (ECDSA P-256/P-384 with SHA-256, or Ed25519).

A signature covers the bundle *digest*, which already covers every file's sha256 (the manifest)
and all metadata except ``created_at``/``provenance``. So verifying = ``Bundle.verify()`` (files
match the manifest) + checking the signature over the recomputed digest. It is stored next to
``expert.json`` as ``expert.sig``::

    {"format_version": 1, "algorithm": "ecdsa-sha256", "digest": "<64 hex>",
     "signature": "<base64 DER>", "public_key_sha256": "<sha256 of the DER public key>", "signed_at": "..."}

Why not the OpenSSF ``model-signing`` package: its 1.1 release pulls in sigstore and ~14 other
packages for what is here one ECDSA signature over a digest we already compute; a bundle signed
here can still be signed additionally with ``model_signing`` by anyone who wants Sigstore.

Keys are PEM files, e.g. ``openssl ecparam -genkey -name prime256v1 -noout -out key.pem`` and
``openssl ec -in key.pem -pubout -out pub.pem``. An encrypted private key reads its password from
``$MOEMERGE_KEY_PASSWORD``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from .atomic import atomic_write_text, dump_json
from .bundle import SIGNATURE, Bundle, now_iso
from .errors import FormatError, IntegrityError, UsageError
from .hashing import sha256_bytes

SIG_FORMAT_VERSION = 1
_DOMAIN = b"moemerge-bundle-digest-v1:"  # domain separation: this key's signatures mean "this bundle digest"
MAX_SIG_BYTES = 64 * 1024


def _message(digest: str) -> bytes:
    return _DOMAIN + digest.encode("ascii")


def _load_private(path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = Path(path).read_bytes()
    pw = os.environ.get("MOEMERGE_KEY_PASSWORD")
    try:
        key = load_pem_private_key(data, password=pw.encode() if pw else None)
    except TypeError as exc:  # encrypted without password, or password for an unencrypted key
        raise UsageError(f"cannot open the private key: {exc}", where=str(path), hint="set MOEMERGE_KEY_PASSWORD for an encrypted key") from exc
    except ValueError as exc:
        raise FormatError("not a PEM private key (or wrong password)", where=str(path)) from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise UsageError(f"unsupported key type {type(key).__name__}", where=str(path), hint="use an EC (P-256/P-384) or Ed25519 key")
    return key


def _load_public(path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except ValueError as exc:
        raise FormatError("not a PEM public key", where=str(path), hint="pass the public key (openssl ec -in key.pem -pubout)") from exc
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise UsageError(f"unsupported key type {type(key).__name__}", where=str(path), hint="use an EC (P-256/P-384) or Ed25519 key")
    return key


def _key_id(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return sha256_bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def sign_bundle(bundle: Bundle, key_path: str | os.PathLike) -> Path:
    """Verify the bundle's files, then write ``expert.sig`` over its digest with a private key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle.verify()  # never sign content that does not match its own manifest
    key = _load_private(Path(key_path))
    msg = _message(bundle.digest)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig, algo = key.sign(msg, ec.ECDSA(hashes.SHA256())), "ecdsa-sha256"
    else:
        sig, algo = key.sign(msg), "ed25519"
    doc = {"format_version": SIG_FORMAT_VERSION, "algorithm": algo, "digest": bundle.digest,
           "signature": base64.b64encode(sig).decode("ascii"), "public_key_sha256": _key_id(key.public_key()), "signed_at": now_iso()}
    out = bundle.path / SIGNATURE
    atomic_write_text(out, dump_json(doc))
    return out


def read_signature(bundle: Bundle) -> dict:
    p = bundle.path / SIGNATURE
    if not p.is_file() or p.is_symlink():
        raise IntegrityError("the bundle is not signed (no expert.sig)", where=str(bundle.path), hint="sign it with `moemerge sign NAME --key KEY.pem`")
    if p.stat().st_size > MAX_SIG_BYTES:
        raise FormatError("signature file is too large", where=str(p))
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise FormatError("signature is not valid JSON", where=str(p)) from exc
    if not isinstance(doc, dict) or doc.get("format_version") != SIG_FORMAT_VERSION or not isinstance(doc.get("signature"), str):
        raise FormatError("unsupported signature format", where=str(p))
    return doc


def verify_signature(bundle: Bundle, public_key_path: str | os.PathLike) -> dict:
    """Check files against the manifest and ``expert.sig`` against the recomputed digest. IntegrityError if not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle.verify()
    doc = read_signature(bundle)
    where = str(bundle.path / SIGNATURE)
    if doc.get("digest") != bundle.digest:
        raise IntegrityError("the signature is for another bundle digest", where=where, hint="the bundle changed after it was signed")
    key = _load_public(Path(public_key_path))
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, _message(bundle.digest), ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(sig, _message(bundle.digest))
    except (InvalidSignature, ValueError) as exc:
        hint = "signed with another key" if doc.get("public_key_sha256") != _key_id(key) else "the signature was altered"
        raise IntegrityError("signature does not verify with this public key", where=where, hint=hint) from exc
    return doc

"""Base models: resolve a reference offline, load it, and fingerprint it.

A base reference is one of:
  * a local directory with ``config.json`` (a transformers model directory);
  * a local ``.gguf`` file, or a directory holding exactly one ``.gguf`` file (dequantized on load);
  * a Hub id (``org/name``) that is already in the local Hugging Face cache (never downloaded).

The *base fingerprint* identifies a base for compatibility checks: sha256 of the config's
architecture fields (those that decide tensor shapes) plus the tokenizer's vocabulary.
A GGUF file and the fp32 copy saved from it share one fingerprint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .hashing import sha256_json

#: config fields that decide tensor shapes; absent fields are skipped
ARCH_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
)


@dataclass(frozen=True)
class BaseRef:
    """A resolved base model location."""

    ref: str                 # what the user wrote
    path: str                # local directory or Hub id (for from_pretrained)
    gguf_file: str | None = None
    local_only_hub_id: bool = False

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.local_only_hub_id:
            kw["local_files_only"] = True
        return kw


def resolve_base(ref: str | os.PathLike) -> BaseRef:
    """Turn a user's base reference into a loadable location, without network access."""
    ref_s = str(ref)
    p = Path(ref_s).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{ref_s} is a file but not a .gguf model", hint="pass a model directory or a .gguf file")
        return BaseRef(ref_s, str(p.parent), gguf_file=p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return BaseRef(ref_s, str(p))
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return BaseRef(ref_s, str(p), gguf_file=ggufs[0])
        if len(ggufs) > 1:
            raise ModelLoadError(f"{ref_s} holds several .gguf files ({', '.join(ggufs)})", hint="pass the .gguf file itself")
        raise ModelLoadError(f"{ref_s} has no config.json and no .gguf file", hint="pass a transformers model directory")
    if ref_s.count("/") == 1 and not ref_s.startswith((".", "/", "~")):
        return BaseRef(ref_s, ref_s, local_only_hub_id=True)
    raise ModelLoadError(f"base model {ref_s!r} not found", hint="give a local model directory, a .gguf file, or a Hub id already in the local HF cache")


def _offline_error(ref: BaseRef, exc: Exception) -> ModelLoadError:
    if ref.local_only_hub_id:
        return ModelLoadError(
            f"base model {ref.ref!r} is not in the local Hugging Face cache and cannot be downloaded offline",
            hint="download it on a connected machine or pass a local directory / .gguf file",
        )
    return ModelLoadError(f"cannot load base model {ref.ref!r}: {type(exc).__name__}: {exc}".split("\n")[0])


def load_config(ref: str | os.PathLike | BaseRef):
    """The transformers config of a base (cheap: no weights)."""
    from transformers import AutoConfig

    r = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    try:
        cfg = AutoConfig.from_pretrained(r.path, **r.kwargs())
    except Exception as exc:  # transformers raises OSError/ValueError with long texts
        raise _offline_error(r, exc) from exc
    if getattr(cfg, "auto_map", None):
        raise ModelLoadError(f"base model {r.ref!r} asks for remote code (auto_map)", hint="mergekit-moe never runs remote code; use a supported architecture")
    return cfg


def load_tokenizer(ref: str | os.PathLike | BaseRef):
    from transformers import AutoTokenizer

    r = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    try:
        tok = AutoTokenizer.from_pretrained(r.path, **r.kwargs())
    except Exception as exc:
        raise _offline_error(r, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(ref: str | os.PathLike | BaseRef, *, dtype=None, with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` for a base reference, offline. ``dtype`` defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    r = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    load_config(r)  # refuses remote code before any weights are read
    try:
        model = AutoModelForCausalLM.from_pretrained(r.path, dtype=dtype or torch.float32, **r.kwargs())
    except Exception as exc:
        raise _offline_error(r, exc) from exc
    model.eval()
    tok = load_tokenizer(r) if with_tokenizer else None
    return model, tok


def config_fingerprint_fields(config) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d[k] for k in ARCH_FIELDS if d.get(k) is not None}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id), independent of file layout."""
    vocab = tokenizer.get_vocab()
    return sha256_json(sorted(vocab.items(), key=lambda kv: kv[1]))


def base_fingerprint(config, tokenizer) -> str:
    """sha256 over the architecture fields and the tokenizer fingerprint (hex, 64 chars)."""
    return sha256_json({"config": config_fingerprint_fields(config), "tokenizer": tokenizer_fingerprint(tokenizer)})


def fingerprint_of(ref: str | os.PathLike | BaseRef) -> str:
    """Fingerprint of a base reference, loading only its config and tokenizer."""
    r = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    return base_fingerprint(load_config(r), load_tokenizer(r))


def save_plain_copy(ref: str | os.PathLike | BaseRef, out_dir: str | os.PathLike) -> Path:
    """Save an fp32 transformers copy of a base (e.g. a GGUF file) for fast later loads.

    transformers refuses ``save_pretrained`` on GGUF-loaded models, so we rebuild a fresh model
    from the config without ``quantization_config`` and load the dequantized state dict into it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .atomic import staging_dir

    r = ref if isinstance(ref, BaseRef) else resolve_base(ref)
    model, tok = load_base(r)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelLoadError(f"copying {r.ref!r} lost weights: missing={missing[:3]} unexpected={unexpected[:3]}")
    if "lm_head.weight" in missing:
        fresh.tie_weights()
    out = Path(out_dir)
    with staging_dir(out, overwrite=True) as stage:
        fresh.save_pretrained(stage)
        tok.save_pretrained(stage)
    return out

"""Typed errors. Every error says what is wrong, where, and how to fix it.

The CLI prints ``str(err)`` as one line and exits 1 (``--debug`` shows the traceback).
Library code raises these instead of printing or exiting.
"""

from __future__ import annotations


class MoeMergeError(Exception):
    """Base class: ``what`` is wrong, ``where`` (file, key path, tensor), ``hint`` how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        msg = self.what
        if self.where:
            msg = f"{self.where}: {msg}"
        if self.hint:
            msg = f"{msg} ({self.hint})"
        # one line, always: collapse newlines that slipped in from nested messages
        return " ".join(msg.split("\n"))


class UsageError(MoeMergeError):
    """Bad command-line usage the CLI could not catch itself (exit code 2)."""


class FormatError(MoeMergeError):
    """A file is not in the expected format (bad safetensors, bad JSON, wrong format_version)."""


class IntegrityError(MoeMergeError):
    """A file's hash or size does not match its manifest, or a signature does not verify."""


class UnsafeFileError(MoeMergeError):
    """A file type we refuse to load (pickle, code, remote code) or a path that escapes its folder."""


class ValidationError(MoeMergeError):
    """Adapter tensors do not fit the base model (unknown module, shape, rank, NaN/Inf, dtype)."""


class BundleError(MoeMergeError):
    """An expert bundle is missing pieces or is inconsistent."""


class RegistryError(MoeMergeError):
    """Registry lookups and writes: unknown name, ambiguous reference, conflicting entry."""


class ModelLoadError(MoeMergeError):
    """A base model cannot be found or loaded (offline, missing files, unsupported architecture)."""


class BaseMismatchError(MoeMergeError):
    """An expert was trained on a different base model than the one in use."""


class DataError(MoeMergeError):
    """Task data files: missing fields, unreadable rows, unknown format, missing split."""


class TrainError(MoeMergeError):
    """Training and resume problems (incompatible checkpoint, nothing to train)."""


class CheckpointError(MoeMergeError):
    """Composed Med-MoE-LoRA checkpoint problems."""


class RecipeError(MoeMergeError):
    """A recipe has one or more problems; ``problems`` holds (key_path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], *, file: str | None = None):
        self.problems = problems
        self.file = file
        parts = "; ".join(f"{path or '<root>'}: {msg}" for path, msg in problems)
        n = len(problems)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} in recipe: {parts}",
            where=file,
            hint="see docs/recipes.md for every key",
        )


class HubError(MoeMergeError):
    """Talking to a Hugging Face Hub (auth, missing repo/revision/file, network)."""


class EvalError(MoeMergeError):
    """Evaluation input problems (missing split, mismatched base)."""

"""Progress reporting without printing: library code reports, the CLI renders (rich).

Library functions accept ``reporter: Reporter | None``; ``None`` means silent.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def start(self, task: str, total: int | None = None) -> None:
        """Begin a stage (``total`` steps, or None for an indeterminate stage)."""

    def advance(self, task: str, n: int = 1, **metrics: float | str) -> None:
        """Advance a stage by ``n`` steps; ``metrics`` (loss, tok/s...) are shown next to the bar."""

    def finish(self, task: str) -> None:
        """End a stage."""

    def info(self, message: str) -> None:
        """A one-line notice (defaults used, skipped work, where output went)."""

    def warn(self, message: str) -> None:
        """A one-line warning that does not stop the run."""


class NullReporter:
    """Silent reporter; collects notices so callers and tests can inspect them."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def start(self, task: str, total: int | None = None) -> None:
        pass

    def advance(self, task: str, n: int = 1, **metrics: float | str) -> None:
        pass

    def finish(self, task: str) -> None:
        pass

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def ensure(reporter: Reporter | None) -> Reporter:
    return reporter if reporter is not None else NullReporter()

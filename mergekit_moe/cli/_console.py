"""Shared rich consoles, the rich progress reporter, and table helpers for the CLI."""

from __future__ import annotations

import os
import time
from typing import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _console(**kwargs) -> Console:
    """A terminal keeps its own width; a pipe or log file gets 120 columns instead of rich's 80, so tables and
    progress lines written to a log are not cut to ellipses (``COLUMNS`` still wins)."""
    c = Console(**kwargs)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c = Console(width=120, **kwargs)
    return c


#: results (tables, completions) go to stdout; progress and notices to stderr
out_console = _console(soft_wrap=True)
err_console = _console(stderr=True)


def quiet_libraries() -> None:
    """Silence library progress bars and chatty loggers; our own bars say what happens."""
    import logging
    import os

    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # env vars quiet transformers/datasets when a command imports them later, so `--help`, `list`
    # and `info` do not pay ~2 s for importing them here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "peft", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # libraries' deprecation notices to each other (transformers' `is_gradient_checkpointing`, called by PEFT)
    # are for their developers, not for someone training an expert
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if "transformers" not in sys.modules and "datasets" not in sys.modules:
        return
    try:
        import transformers.utils.logging as tl  # noqa: PLC0415  (imported lazily: slow)

        tl.disable_progress_bar()
        tl.set_verbosity_error()
    except Exception:  # transformers not imported yet or API changed: not fatal
        pass
    try:
        import datasets  # noqa: F401

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:
        pass


class RichReporter:
    """``progress.Reporter`` rendered as rich progress bars on stderr.

    A terminal gets live bars. A pipe or log file cannot redraw, and rich only writes the bars when
    they stop, so there a plain line is also written at every 10% of a task (every minute for a task
    of unknown length): a 20-minute training run in a CI log shows it is moving.
    """

    #: seconds between plain progress lines for tasks without a total
    LOG_EVERY_S = 60.0

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err_console
        self._plain = not self.console.is_terminal
        self._logged: dict[str, tuple[int, float]] = {}  # task -> (last decile, time) of the last plain line
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self._tasks: dict[str, int] = {}
        self._started = False

    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def start(self, task: str, total: int | None = None) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        self._tasks[task] = self._progress.add_task(task, total=total, metrics="")
        self._logged.pop(task, None)  # a task started again under the same name logs from 0% again

    def advance(self, task: str, n: int = 1, **metrics) -> None:
        if task not in self._tasks:
            self.start(task)
        text = "  ".join(f"{k}={fmt_value(v)}" for k, v in metrics.items())
        self._progress.update(self._tasks[task], advance=n, metrics=text)
        if self._plain:
            self._log_line(task, text)

    def _log_line(self, task: str, metrics: str) -> None:
        t = self._progress.tasks[self._tasks[task]]
        decile, last = self._logged.get(task, (0, t.start_time or time.monotonic()))
        now = time.monotonic()
        if t.total:
            d = int(10 * t.completed / t.total)
            if d <= decile or t.completed >= t.total:  # the final state is printed when the bars stop
                return
        elif now - last < self.LOG_EVERY_S:
            return
        else:
            d = decile
        self._logged[task] = (d, now)
        of = f"/{t.total:g}" if t.total else ""
        eta = f", eta {t.time_remaining:.0f}s" if t.total and t.time_remaining is not None else ""
        self.console.print(f"  {task}: {t.completed:g}{of} ({t.elapsed or 0:.0f}s{eta}) {metrics}".rstrip(),
                           highlight=False, markup=False)

    def finish(self, task: str) -> None:
        if task in self._tasks:
            t = self._progress.tasks[self._tasks[task]]
            if t.total is None:
                self._progress.update(self._tasks[task], total=t.completed or 1, completed=t.completed or 1)
            self._progress.stop_task(self._tasks[task])

    def info(self, message: str) -> None:
        self.console.print(f"[cyan]•[/] {message}", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def layer_ranges(rows: Iterable[Sequence[object]]) -> list[list[object]]:
    """Collapse consecutive per-layer rows ``(layer, *cells)`` with equal cells into ``("0-9", *cells)``.

    A 30-layer model with a 3-group schedule prints 3 rows instead of 30.
    """
    out: list[list[object]] = []
    for layer, *cells in rows:
        if out and out[-1][1:] == cells and out[-1][0][1] + 1 == layer:
            out[-1][0] = (out[-1][0][0], layer)
        else:
            out.append([(layer, layer), *cells])
    return [[f"{a}-{b}" if a != b else str(a), *cells] for (a, b), *cells in out]


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def now() -> float:
    return time.perf_counter()


def fmt_value(v) -> str:
    """A table cell: '-' for missing, 4 significant digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def kv_table(title: str, rows) -> Table:
    """A two-column key/value table (``info``, ``push`` summaries)."""
    t = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    return t

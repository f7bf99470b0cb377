"""Where output goes: results to stdout (text or `--json`), logs, progress and errors to stderr.

The library logs through `logging` ("swallowctl.*"); only this module writes to the terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from swallowctl.core.errors import SwallowError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _debug_env() -> bool:
    return os.environ.get("SWALLOWCTL_DEBUG", "") not in ("", "0")


@dataclass
class _State:
    verbose: bool = _debug_env()
    quiet: bool = False
    secondary: bool = False  # a training process other than the main one (rank > 0)


state = _State()


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Route the library's logging through rich on stderr. Called once per command."""
    state.verbose = verbose or _debug_env()
    state.quiet = quiet
    level = logging.DEBUG if state.verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("swallowctl")
    logger.handlers.clear()
    handler = RichHandler(
        console=err, show_time=state.verbose, show_path=state.verbose, markup=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if state.verbose else logging.ERROR)
    if not state.verbose:
        # Per-file "Loading weights" bars and deprecation notices about library internals are
        # noise to a user of swallowctl; --verbose shows them.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def be_secondary() -> None:
    """A training process other than the main one: errors only, and none the main one reports."""
    state.secondary = state.quiet = True
    logging.getLogger("swallowctl").setLevel(logging.ERROR)


# Libraries that warn about things users cannot act on. bitsandbytes on CPU says it could not
# fetch an optional kernel from the Hub (`kernels` package): its built-in fallback works, and we
# would not want code fetched from the Hub at run time anyway.
_NOISY = ("bitsandbytes.backends.cpu.ops",)


def print_json(data: Any) -> None:
    """One JSON document on stdout (UTF-8, Japanese kept readable)."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_text(text: str) -> None:
    """A plain result line on stdout, no markup interpretation."""
    out.print(text, markup=False, highlight=False)


def info(message: str) -> None:
    """A progress or plan line on stderr, shown unless --quiet."""
    if not state.quiet:
        err.print(Text(message), highlight=False)


def warn(message: str) -> None:
    """A warning on stderr, shown unless --quiet."""
    if not state.quiet:
        err.print(Text.assemble(("warning: ", "yellow"), message), highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table; the caller prints it with `out.print`."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "dim"}


def render_doctor(report: Any) -> None:
    """The doctor's table and verdict (report: swallowctl.doctor.DoctorReport)."""
    t = Table(header_style="bold", show_lines=False)
    for c in ("check", "status", "value", "fix"):
        t.add_column(c, overflow="fold")
    for c in report.checks:
        t.add_row(
            c.title,
            Text(c.status, style=_STATUS_STYLE[c.status]),
            Text(c.value),
            Text(c.fix or ""),
        )
    out.print(t)
    v = report.verdict
    style = "green" if (v.can_train if v.backend == "torch" else v.can_infer) else "bold red"
    out.print(Text.assemble(("verdict: ", "bold"), (v.summary, style)))
    out.print(Text.assemble(("memory: ", "bold"), v.memory))


@contextlib.contextmanager
def update_progress(total: int) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """A progress bar over PPO updates; yields the trainer's `on_update(update, metrics)`."""
    bar = Progress(
        TextColumn("update {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=err,
        disable=state.quiet,
    )
    task = bar.add_task("train", total=total, stats="")

    def on_update(update: int, m: dict[str, float]) -> None:
        stats = (
            f"reward {m.get('objective/scores', float('nan')):+.3f} "
            f"kl {m.get('objective/kl', float('nan')):.4f} "
            f"{m.get('throughput/episodes_per_s', 0.0):.1f} ep/s"
        )
        bar.update(task, completed=update, stats=stats)

    with bar:
        yield on_update


def render_download_plan(plan: Any) -> None:
    """`download --dry-run`: what would be fetched (plan: swallowctl.hub.DownloadPlan)."""
    t = table(
        f"{plan.repo_id} @ {plan.commit} -> {plan.destination}",
        ["file", "size", "on disk"],
        [(f.path, _size(f.size), _size(f.present_bytes)) for f in plan.files],
    )
    out.print(t)
    for f in plan.skipped:
        out.print(Text(f"skipped {f.path} ({_size(f.size)}): {f.reason}", style="dim"))
    out.print(
        Text(f"total {_size(plan.total_bytes)}, still to fetch {_size(plan.remaining_bytes)}")
    )


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KB", "MB"):
        if x < 1000:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def file_progress(bar: Progress) -> Callable[[str, int, int], None]:
    """An `on_progress(path, done, total)` callback drawing one bar per file."""
    tasks: dict[str, Any] = {}

    def update(path: str, done: int, total: int) -> None:
        if path not in tasks:
            tasks[path] = bar.add_task(path, total=total, completed=done)
        bar.update(tasks[path], completed=done)

    return update


def download_progress() -> Progress:
    """Progress bar for byte transfers, on stderr; silent with --quiet."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=state.quiet,
        transient=False,
    )


def report_error(e: BaseException) -> int:
    """Print an error as one line (plus hint) on stderr and return the exit code.

    Known errors (SwallowError) are the user's to fix or a clear runtime failure; anything else is
    our bug: one line too, with the traceback only under --verbose / SWALLOWCTL_DEBUG=1.
    """
    if state.secondary and getattr(e, "reported_by_main", False):
        return getattr(e, "exit_code", 1)  # every process stopped on it; the main one says why
    if state.verbose:
        err.print("".join(traceback.format_exception(e)), markup=False, highlight=False)
    # Text objects, not markup: messages quote user input, which may contain [brackets].
    if isinstance(e, SwallowError):
        for line in e.message.splitlines():
            err.print(Text.assemble(("error: ", "bold red"), line), highlight=False)
        if e.hint:
            err.print(Text.assemble(("hint: ", "cyan"), e.hint), highlight=False)
        return e.exit_code
    err.print(Text.assemble(("error: ", "bold red"), f"unexpected {type(e).__name__}: {e}"))
    if not state.verbose:
        err.print(Text.assemble(("hint: ", "cyan"), "run again with --verbose for the traceback"))
    return 1

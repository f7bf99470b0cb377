"""`swallowctl infer --input rows.jsonl --output answers.jsonl`: resumable batches.

Input rows use the training data's format (`prompt` or `messages`; every other column is copied
to the output row). Each output row records its input line (`_line`) and a hash of that row and
the messages it rendered to (`_input_sha256`), so a rerun skips what is done, refuses an output
made from another input or prompt, and redoes a row whose write was torn by a crash. Rows are
flushed and fsynced batch by batch. (The model is not part of the key: a new model wants a new
--output.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from swallowctl.core import console
from swallowctl.core.errors import DataError, UsageError
from swallowctl.core.modes import ModeSpec
from swallowctl.core.paths import check_creatable
from swallowctl.infer import Completion, GenerationSettings, InferenceBackend, Message
from swallowctl.infer.session import parse

log = logging.getLogger(__name__)

LINE_KEY, HASH_KEY = "_line", "_input_sha256"  # how an output row names its input row
ANSWER_KEYS = ("response", "tokens", "finish_reason")
CHOICE_KEYS = ("choice", "label", "valid_choice")


@dataclass
class BatchRow:
    """One input row, checked and rendered into the messages the model sees."""

    line: int  # 1-based line number in the input file: the row's key
    data: dict[str, Any]
    messages: list[Message]
    sha: str


@dataclass
class BatchPlan:
    """Input rows (validated, rendered) and which of them the output already holds."""

    input: Path
    output: Path
    rows: list[BatchRow]
    done: set[int] = field(default_factory=set)

    @property
    def todo(self) -> list[BatchRow]:
        """Rows still to answer, in input order."""
        return [r for r in self.rows if r.line not in self.done]


@dataclass
class BatchResult:
    """What a run did: rows skipped (done before), written now, and left for a later run."""

    output: Path
    rows: int  # rows in the input
    skipped: int  # already in the output before this run
    written: int = 0
    no_choice: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def remaining(self) -> int:
        """Rows neither done before nor written now (after --limit or an interruption)."""
        return self.rows - self.skipped - self.written

    def to_json(self) -> dict[str, Any]:
        """The summary `infer --input ... --json` prints."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return {
            "output": str(self.output),
            "rows": self.rows,
            "skipped": self.skipped,
            "written": self.written,
            "remaining": self.remaining,
            "no_valid_choice": self.no_choice,
            "tokens": self.tokens,
            "tokens_per_s": round(rate, 2),
        }


def plan_batch(input_path: Path, output_path: Path, mode: ModeSpec) -> BatchPlan:
    """Read and check every input row and the existing output, before any model loads.

    Raises:
        DataError: `FILE:LINE: what is wrong` for a bad input row, or an output row that does
            not belong to this input.
    """
    if input_path.resolve() == output_path.resolve():
        raise UsageError("--input and --output are the same file")
    check_creatable(output_path, "--output")
    rows = list(_read_input(input_path, mode))
    if not rows:
        raise DataError(f"{input_path}: no rows", hint="one JSON object per line")
    plan = BatchPlan(input_path, output_path, rows)
    plan.done = _scan_output(output_path, {r.line: r.sha for r in rows}, input_path)
    return plan


def _row_sha(obj: dict[str, Any], messages: list[Message]) -> str:
    # The rendered messages are hashed too: a changed --mode, --system or template makes the
    # old answers stale just as a changed row does.
    both = {"row": obj, "messages": messages}
    canonical = json.dumps(both, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read_input(path: Path, mode: ModeSpec) -> Iterator[BatchRow]:
    from swallowctl.ppo.data import check_row, render_messages

    reserved = (LINE_KEY, HASH_KEY, *ANSWER_KEYS, *(CHOICE_KEYS if mode.choices else ()))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        problem = check_row(obj)
        if problem:
            raise DataError(f"{where}: {problem}")
        clash = [k for k in reserved if k in obj]
        if clash:
            raise DataError(
                f"{where}: column '{clash[0]}' would be overwritten by the answer",
                hint=f"rename it; infer adds {', '.join(reserved)}",
            )
        messages = render_messages(obj, mode, where=where)
        yield BatchRow(number, obj, messages, _row_sha(obj, messages))


def _scan_output(path: Path, shas: dict[int, str], input_path: Path) -> set[int]:
    """Lines already answered in `path`; a torn last line is cut off so it is redone."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    done: set[int] = set()
    good_end = 0  # end of the last row known to be whole
    complete = raw.split(b"\n")[:-1]  # what follows the last newline is never a whole row
    for i, line in enumerate(complete):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                if i == len(complete) - 1:
                    break  # garbage on the last line: a torn write too (e.g. zero-filled)
                raise DataError(
                    f"{path}:{i + 1}: not valid JSON; fix or delete that line"
                ) from None
            done.add(_check_output_row(obj, shas, f"{path}:{i + 1}", input_path))
        good_end += len(line) + 1
    if good_end < len(raw):
        log.warning("%s: dropped an incomplete last row (an interrupted write); redoing it", path)
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


def _check_output_row(obj: Any, shas: dict[int, str], where: str, input_path: Path) -> int:
    line = obj.get(LINE_KEY) if isinstance(obj, dict) else None
    if not isinstance(line, int):
        raise DataError(
            f"{where}: not a row written by swallowctl infer (no '{LINE_KEY}')",
            hint="give a new --output file",
        )
    if shas.get(line) != obj.get(HASH_KEY):
        raise DataError(
            f"{where}: answers {input_path}:{line}, but that row (or the mode's prompt) has "
            "changed since, or is gone",
            hint="write to a new --output, or delete the old one to start over",
        )
    return line


def run_batch(
    backend: InferenceBackend | None,
    plan: BatchPlan,
    mode: ModeSpec,
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    on_rows: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Answer the rows not done yet, appending one output row each, flushed batch by batch.

    `limit` stops after that many new rows (a later run continues). `on_rows(rows, tokens)` is
    called after every batch. Interrupting loses at most the batch in flight. `backend` may be
    None when the plan has nothing left to do (no model needs loading then).
    """
    todo = plan.todo[:limit] if limit else plan.todo
    result = BatchResult(plan.output, len(plan.rows), len(plan.done))
    if not todo:
        return result
    if backend is None:
        raise ValueError("run_batch needs a backend: rows are left to answer")
    start = time.perf_counter()
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    with plan.output.open("a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            done = backend.generate_batch([r.messages for r in chunk], settings)
            for row, completion in zip(chunk, done, strict=True):
                out = _output_row(row, completion, mode)
                result.no_choice += out.get("valid_choice") is False
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a row counts as done only once it is on disk
            tokens = sum(len(c.token_ids) for c in done)
            result.written += len(chunk)
            result.tokens += tokens
            result.seconds = time.perf_counter() - start
            if on_rows:
                on_rows(len(chunk), tokens)
    return result


def _output_row(row: BatchRow, c: Completion, mode: ModeSpec) -> dict[str, Any]:
    out = dict(row.data)
    out.update(response=c.text, tokens=len(c.token_ids), finish_reason=c.finish_reason)
    if mode.choices:
        choice = parse(c.text, mode)
        out.update(
            choice=choice, label=mode.choices.get(choice or ""), valid_choice=choice is not None
        )
    out[LINE_KEY], out[HASH_KEY] = row.line, row.sha
    return out


@contextlib.contextmanager
def batch_progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """Rows done and tokens/s on stderr; yields `on_rows(rows, tokens)` for `run_batch`."""
    bar = Progress(
        TextColumn("rows {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console.err,
        disable=console.state.quiet,
    )
    task = bar.add_task("infer", total=total, rate="")
    start, tokens = time.perf_counter(), 0

    def on_rows(rows: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        rate = tokens / max(time.perf_counter() - start, 1e-9)
        bar.update(task, advance=rows, rate=f"{rate:.1f} tok/s")

    with bar:
        yield on_rows

"""Training prompts: read, validate and render them through a mode; feed them in resumable batches.

Sources (`data.prompts` in the config):
- a JSONL file (one JSON object per line), or a `.json` file holding JSONL or one JSON array;
- a Hub dataset id, `owner/name` or `owner/name:SPLIT` (SPLIT may slice: `train[:1000]`),
  read with the optional `datasets` package;
- `builtin:prompts-ja`, our bundled set (chat rows, and observation rows for `intervention`).

A row gives either `prompt` (text, laid out by the mode's template) or `messages` (a chat list of
`{role, content}`, used as it is). Every other column is kept and handed to the reward functions,
one list per column. Everything is checked before any model loads: a bad row stops the run with
`FILE:LINE: what is wrong`, the first problem and how many more bad lines there are (exit 2).

`PromptStream` yields batches forever, reshuffled per epoch from a seed, and its cursor
(`state_dict()`) goes into checkpoints so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from swallowctl.core.errors import ConfigError, DataError, MissingDependencyError
from swallowctl.core.modes import INTERVENTION_CHOICES, ModeSpec

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = "builtin:prompts-ja"
_BUILTIN_RESOURCE = "data/prompts_ja.jsonl"

# A prompt row is a few KB at most; a line past this is a JSON array on one line, a binary file
# or a dump of documents. Reading it would cost memory for nothing, so say so and skip it.
MAX_LINE_BYTES = 1_000_000

ROLES = ("system", "user", "assistant")

# Names every reward function already receives as arguments (TRL's GRPO signature plus ours); a
# dataset column of the same name would collide with them in `f(..., **columns)`.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "finished", "mode")

# `owner/name` or `owner/name:split` (split as `datasets` reads it, slices included).
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.\[\]:%+-]+)?$")

Message = dict[str, str]


@dataclass
class PromptRow:
    """One training prompt, rendered for a mode.

    `messages` is the chat list the policy sees (mode system prompt included); `columns` holds the
    row's other fields (and `prompt`, when the row gave one) for the reward functions; `where` is
    `FILE:LINE` (or `owner/name[split]:ROW`) for messages about this row.
    """

    messages: list[Message]
    columns: dict[str, Any]
    where: str

    @property
    def prompt_text(self) -> str:
        """What reward functions get as the prompt: the row's `prompt` text, else the last user
        message (PPO, GRPO and RLOO hand over the same)."""
        if isinstance(self.columns.get("prompt"), str):
            return str(self.columns["prompt"])
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


class _Bad:
    """A line that could not be read; carries the message (without the `FILE:LINE:` prefix)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


# --- rendering ----------------------------------------------------------------------------------


def render_messages(row: Mapping[str, Any], mode: ModeSpec, *, where: str = "row") -> list[Message]:
    """Turn one (validated) row into the chat messages the policy is prompted with.

    A `prompt` row becomes the mode's system prompt (when it has one) plus one user message,
    `mode.template.format(**fields)` over the row's columns (`prompt` included). A `messages` row
    is used as it is; the mode's system prompt is put first only when the row has none.

    Raises:
        DataError: the template names a column this row lacks (`WHERE: ...` names it).
        ConfigError: the template itself is not a valid format string.
    """
    messages = row.get("messages")
    if messages is not None:
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
        if mode.system is not None and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": mode.system})
        return out
    fields = {k: v for k, v in row.items() if v is not None}
    try:
        text = mode.template.format(**fields)
    except KeyError as e:
        have = ", ".join(sorted(fields)) or "none"
        raise DataError(
            f"{where}: the mode's template names {{{e.args[0]}}}, but this row has no "
            f"'{e.args[0]}' column (it has: {have})",
            hint="add the column to every row, or change the mode's template",
        ) from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"mode template {mode.template!r} is not a valid format string: {e}",
            hint="name row fields in braces, e.g. '{prompt}'; write '{{' for a literal brace",
        ) from None
    if not text.strip():
        raise DataError(f"{where}: the mode's template renders an empty user message")
    out = [] if mode.system is None else [{"role": "system", "content": mode.system}]
    out.append({"role": "user", "content": text})
    return out


# --- validation ---------------------------------------------------------------------------------


def check_row(obj: Any) -> str | None:
    """Return what is wrong with one raw row (without location), or None when it is usable."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}"
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        return f"needs 'prompt' (text) or 'messages' (a chat list); its keys: {keys}"
    if prompt is not None and messages is not None:
        return "gives both 'prompt' and 'messages'; keep one"
    clash = [k for k in RESERVED_COLUMNS if k in obj]
    if clash:
        return (
            f"column '{clash[0]}' clashes with an argument every reward function receives; "
            "rename it"
        )
    if prompt is not None:
        if not isinstance(prompt, str):
            return f"'prompt' must be a string, got {_json_type(prompt)}"
        if not prompt.strip():
            return "'prompt' is empty"
        return None
    return _check_messages(messages)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"'messages' must be a list of {{role, content}} objects, got {_json_type(messages)}"
    if not messages:
        return "'messages' is empty"
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"{at} must be an object with 'role' and 'content', got {_json_type(m)}"
        for key in ("role", "content"):
            if key not in m:
                return f"{at} has no '{key}'"
            if not isinstance(m[key], str):
                return f"{at}.{key} must be a string, got {_json_type(m[key])}"
        if m["role"] not in ROLES:
            return f"{at}.role is {m['role']!r}; expected one of {', '.join(ROLES)}"
        if not m["content"].strip():
            return f"{at}.content is empty"
        if m["role"] == "system" and i > 0:
            return f"{at}: a system message may only come first"
    if messages[-1]["role"] != "user":
        # The policy answers the last message; ending on an assistant turn would make it
        # continue its own text, which is not what a prompt set means.
        return f"the last message must be from the user, not {messages[-1]['role']!r}"
    return None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for t, name in names.items():
        if isinstance(value, t):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


# --- sources ------------------------------------------------------------------------------------


def load_prompts(
    spec: str,
    mode: ModeSpec,
    *,
    limit: int | None = None,
    mode_name: str | None = None,
    announce: bool = True,
) -> list[PromptRow]:
    """Read, validate and render the prompts named by `spec` for `mode`.

    Args:
        spec: a JSONL/JSON file, a Hub dataset id (`owner/name[:split]`) or `builtin:prompts-ja`.
        mode: the prompt profile the rows are rendered with.
        limit: read at most this many rows (rows past it are neither read nor checked).
        mode_name: only for `builtin:prompts-ja`: which of its subsets to use. Default: the
            intervention rows for a mode whose choices are the intervention strategies, the chat
            rows for every other mode.
        announce: log the count at INFO (else DEBUG: the trainers load again what
            `check_inputs` already reported).

    Raises:
        DataError: `WHERE: what is wrong` for the first bad row, plus how many more there are;
            also for a missing or empty file.
        MissingDependencyError: a Hub dataset without the `datasets` package.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if spec.strip().lower() == BUILTIN_PROMPTS:
        subset = mode_name or ("intervention" if mode.choices == INTERVENTION_CHOICES else "chat")
        records = _builtin_records(subset)
        label = BUILTIN_PROMPTS
    else:
        path = Path(spec).expanduser()
        if path.exists() or path.suffix.lower() in (".jsonl", ".json"):
            records = _file_records(path)
            label = str(path)
        elif _HUB_ID.match(spec.strip()):
            records = _hub_records(spec.strip(), limit)
            label = spec.strip()
        else:
            raise DataError(
                f"{spec}: not a file, a Hub dataset id (owner/name) or {BUILTIN_PROMPTS}",
                hint='point data.prompts at a .jsonl file of {"prompt": ...} rows',
            )
    rows = _validate(records, mode, label, limit)
    log.log(
        logging.INFO if announce else logging.DEBUG, "loaded %d prompts from %s", len(rows), label
    )
    return rows


def _validate(
    records: Iterable[tuple[str, Any]], mode: ModeSpec, label: str, limit: int | None
) -> list[PromptRow]:
    """Check and render every record; raise one DataError for the first bad one."""
    rows: list[PromptRow] = []
    errors: list[str] = []
    for where, obj in records:
        problem = obj.message if isinstance(obj, _Bad) else check_row(obj)
        if problem is None:
            try:
                messages = render_messages(obj, mode, where=where)
            except DataError as e:
                problem = e.message.removeprefix(f"{where}: ")
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        columns = {k: v for k, v in obj.items() if k != "messages" and v is not None}
        rows.append(PromptRow(messages=messages, columns=columns, where=where))
        if limit is not None and len(rows) >= limit:
            break
    if errors:
        more = len(errors) - 1
        tail = f" (and {more} more bad line{'s' if more > 1 else ''})" if more else ""
        raise DataError(
            errors[0] + tail,
            hint="each line must be a JSON object with 'prompt' (text) or 'messages' (chat list)",
        )
    if not rows:
        what = "blank lines" if Path(label).is_file() else "no rows"
        raise DataError(f"{label}:1: no prompts: it holds only {what}")
    return rows


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, object or _Bad) for each non-blank line of a JSONL (or JSON array) file."""
    if not path.exists():
        raise DataError(f"{path}: no such file", hint="check data.prompts in the config")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; data.prompts needs a .jsonl file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{path}:1: the file is empty", hint="write one JSON object per line")
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        return _json_array_records(path)
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        lineno = 0
        while True:
            # Bounded read: a 2 GB line never lands in memory, only its first MAX+1 bytes.
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = f.readline(1 << 20)
                yield (
                    where,
                    _Bad(
                        f"line is longer than {MAX_LINE_BYTES:,} bytes; a prompt row should be far "
                        "shorter (is this a JSON array or a binary file?)"
                    ),
                )
                continue
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM from Windows editors
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    where,
                    _Bad(
                        f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                        "save the file as UTF-8"
                    ),
                )
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _Bad(f"not valid JSON: {e.msg} (column {e.colno})")


def _json_array_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Elements of a `[{...}, {...}]` file, each located at the line where it starts."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield f"{path}:{line}", _Bad(f"not UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8")
        return
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def skip(i: int) -> int:
        m = ws.match(text, i)
        return m.end() if m else i

    i = skip(text.index("[") + 1)
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)  # incremental: O(file) over the whole scan
        counted = pos
        return line

    if text.startswith("]", i):
        return
    while True:
        where = f"{path}:{line_at(i)}"
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # Inside an array there is no next line to resume from: report and stop.
            yield f"{path}:{e.lineno}", _Bad(f"not valid JSON: {e.msg} (column {e.colno})")
            return
        yield where, obj
        i = skip(end)
        if text.startswith(",", i):
            i = skip(i + 1)
        elif text.startswith("]", i):
            rest = text[i + 1 :].strip()
            if rest:
                yield f"{path}:{line_at(i)}", _Bad("text after the closing ']'")
            return
        else:
            yield f"{path}:{line_at(i)}", _Bad("expected ',' or ']' between array elements")
            return


def _hub_records(spec: str, limit: int | None) -> Iterator[tuple[str, Any]]:
    """Rows of a Hub dataset through `datasets` (optional: not a swallowctl dependency)."""
    try:
        import datasets
    except ImportError:
        err = MissingDependencyError("datasets", "data", f"reading the Hub dataset '{spec}'")
        err.hint = "pip install datasets, or export the prompts to a .jsonl file"
        raise err from None
    repo, _, split = spec.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(repo, split=split)
    except FileNotFoundError as e:
        raise DataError(f"{spec}: no such dataset or split ({e})") from None
    except Exception as e:  # network, auth, parsing: `datasets` raises many kinds
        raise DataError(f"{spec}: cannot load the dataset: {type(e).__name__}: {e}") from None
    if limit is not None and hasattr(ds, "select"):
        ds = ds.select(range(min(limit, len(ds))))
    return ((f"{repo}[{split}]:{i + 1}", dict(row)) for i, row in enumerate(ds))


def _builtin_records(subset: str) -> Iterator[tuple[str, Any]]:
    """The bundled set's rows of one `mode` subset (the `mode` column itself is dropped)."""
    text = resources.files("swallowctl.ppo").joinpath(_BUILTIN_RESOURCE).read_text("utf-8")
    found = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if obj.pop("mode", "chat") == subset:
            found = True
            yield f"{BUILTIN_PROMPTS}:{lineno}", obj
    if not found:
        raise DataError(
            f"{BUILTIN_PROMPTS} has no rows for '{subset}'",
            hint="its subsets are 'chat' and 'intervention'",
        )


def builtin_subsets() -> dict[str, int]:
    """Row counts of `builtin:prompts-ja` per mode subset (for docs and `config show`)."""
    text = resources.files("swallowctl.ppo").joinpath(_BUILTIN_RESOURCE).read_text("utf-8")
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.strip():
            mode = json.loads(line).get("mode", "chat")
            counts[mode] = counts.get(mode, 0) + 1
    return counts


# --- batches ------------------------------------------------------------------------------------


def reward_columns(rows: Sequence[PromptRow]) -> dict[str, list[Any]]:
    """Collate a batch's columns for the reward functions: one list per column, one value per row.

    A column missing from some rows gives None there. `messages` (the rendered chat) is added, so
    a reward model can score the conversation as the policy saw it.
    """
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.columns))
    out = {name: [row.columns.get(name) for row in rows] for name in names}
    out["messages"] = [row.messages for row in rows]
    return out


class PromptStream:
    """Endless batches of prompts: a fresh deterministic shuffle each epoch, resumable.

    Epoch `e`'s order is a permutation drawn from `random.Random(f"{seed}/{e}")` (string seeds
    hash through SHA-512, so the order is the same in every process and Python version 3.x). A
    batch that reaches the end of an epoch is filled from the start of the next one, so every
    batch is full and every row is seen once per epoch.

    Several processes (`world` > 1): every process walks the same global order and keeps the same
    cursor; `next_batch(n)` draws `n * world` rows and returns this `rank`'s `n` of them. So the
    ranks never overlap, and one process's `state_dict()` is valid for all of them.

    `state_dict()` / `load_state_dict()` carry the cursor (epoch, position, seed) and a
    fingerprint of the rows: restoring it gives the very batches the original run would have seen.
    """

    def __init__(
        self,
        rows: Sequence[PromptRow],
        batch_size: int | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not rows:
            raise ValueError("PromptStream needs at least one row")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.rows = list(rows)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._fingerprint = _fingerprint(self.rows)
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[PromptRow]]:
        return self

    def __next__(self) -> list[PromptRow]:
        return self.next_batch()

    def next_batch(self, n: int | None = None) -> list[PromptRow]:
        """This process's next `n` rows (default `batch_size`); the cursor moves `n * world`."""
        n = n if n is not None else self.batch_size
        if n is None or n <= 0:
            raise ValueError(f"next_batch needs a positive size (got {n})")
        wanted = n * self.world
        drawn: list[int] = []
        while len(drawn) < wanted:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._order_for(self.epoch)
            take = self._order[self.position : self.position + wanted - len(drawn)]
            drawn.extend(take)
            self.position += len(take)
        mine = drawn[self.rank * n : (self.rank + 1) * n]
        return [self.rows[i] for i in mine]

    def state_dict(self) -> dict[str, Any]:
        """The cursor, as plain JSON-able data for a checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.rows),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved cursor.

        Raises:
            DataError: the prompt set has a different number of rows than when it was saved
                (positions would point at other prompts).
        """
        num_rows = int(state.get("num_rows", len(self.rows)))
        if num_rows != len(self.rows):
            raise DataError(
                f"the prompts changed since the checkpoint: {num_rows} rows then, "
                f"{len(self.rows)} now",
                hint="resume with the same data.prompts, or start a new run",
            )
        if state.get("fingerprint", self._fingerprint) != self._fingerprint:
            log.warning("prompt texts changed since the checkpoint; resuming with the new texts")
        if int(state["seed"]) != self.seed:
            log.warning("data seed %s from the checkpoint replaces %s", state["seed"], self.seed)
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._order_for(self.epoch)


def _fingerprint(rows: Sequence[PromptRow]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.messages, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]

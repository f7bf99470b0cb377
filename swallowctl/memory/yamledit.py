"""Write tune-memory's suggestion into a config file, keeping every other byte as it was.

PyYAML drops comments and ruamel.yaml is not a dependency, so values are edited on their lines:
`load_yaml_with_lines` says where each key is, and only the value text of that line changes (a
trailing comment keeps its column where it can). Missing keys are added at the end of their
section with the indentation of its other keys; a missing section is appended to the file.
The result is checked by loading it with the real loader before it replaces the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swallowctl.core.errors import ConfigError, RuntimeFailure
from swallowctl.core.yamlpos import load_yaml_with_lines

# indent, key (plain or quoted), colon and spaces, value, optional " # comment", line end.
_LINE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<key>\"[^\"]*\"|'[^']*'|[^\s#:'\"][^:#]*?)(?P<sep>[ \t]*:[ \t]*)"
    r"(?P<value>.*?)(?P<gap>[ \t]*)(?P<comment>#.*?)?(?P<eol>\r\n|[\n\r\x85\u2028\u2029])?$",
    re.DOTALL,
)
_YAML_LINES = re.compile(r"(?<=[\n\x85\u2028\u2029])|(?<=\r)(?!\n)")


def format_value(value: Any) -> str:
    """A scalar as YAML writes it: true/false, numbers as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"tune-memory writes only numbers and booleans, not {value!r}")


def write_changes(path: Path, changes: dict[str, Any]) -> list[str]:
    """Set each dotted key of `changes` (section.key) in the YAML file at `path`, in place.

    Returns one line per change ("ppo.grad_accum_steps: 2 -> 4 (line 31)").
    Raises ConfigError when the file's layout cannot be edited safely (a flow mapping), and
    RuntimeFailure when the edited file would not load (the file is then left as it was).
    """
    # Lines as PyYAML counts them (reader.py: \n, \r\n, a lone \r, NEL, LS, PS), so that the
    # line numbers of load_yaml_with_lines index this list; str.splitlines differs (\v, \f...).
    lines = _YAML_LINES.split(path.read_bytes().decode("utf-8"))
    if lines and lines[-1] == "":
        lines.pop()
    data, positions = load_yaml_with_lines(path)
    report: list[str] = []
    missing: dict[str, list[tuple[str, str]]] = {}
    for dotted_key, value in changes.items():
        section, key = dotted_key.split(".", 1)
        text = format_value(value)
        if (section, key) in positions:
            n = positions[(section, key)]
            old = _set_value(lines, n, text, path)
            report.append(f"{dotted_key}: {old} -> {text} (line {n})")
        else:
            missing.setdefault(section, []).append((key, text))
    # Edits in place keep line numbers; insertions go bottom-up so the positions above hold.
    for section in sorted(missing, key=lambda s: -positions.get((s,), len(lines) + 1)):
        _add_keys(lines, data, positions, section, missing[section], path)
        report += [f"{section}.{key}: added {text}" for key, text in missing[section]]
    _replace_checked(path, "".join(lines), changes)
    return report


def _set_value(lines: list[str], n: int, text: str, path: Path) -> str:
    """Replace the value on 1-based line n; keep indentation, key, spacing and comment."""
    m = _LINE.match(lines[n - 1])
    if m is None or not m["value"].strip() or m["value"].lstrip().startswith(("{", "[", "|", ">")):
        raise ConfigError(f"{path}:{n}: cannot edit this line in place; set the value by hand")
    old = m["value"]
    gap = m["gap"]
    if m["comment"]:  # keep the comment's column when the new value leaves room
        gap = " " * max(1, len(old) + len(gap) - len(text))
    lines[n - 1] = (
        f"{m['indent']}{m['key']}{m['sep']}{text}{gap}{m['comment'] or ''}{m['eol'] or ''}"
    )
    return old


def _add_keys(
    lines: list[str],
    data: Any,
    positions: dict[Any, int],
    section: str,
    items: list[tuple[str, str]],
    path: Path,
) -> None:
    """Insert `key: text` lines at the end of `section` (appending the section if absent)."""
    eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    if (section,) not in positions:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += eol
        lines.append(f"{section}:{eol}")
        lines.extend(f"  {key}: {text}{eol}" for key, text in items)
        return
    head = positions[(section,)]
    body = data.get(section) if isinstance(data, dict) else None
    if body is None or body == {}:
        _clear_empty_value(lines, head, path)
    elif not isinstance(body, dict) or _is_flow(lines[head - 1]):
        raise ConfigError(f"{path}:{head}: {section}: not a block mapping; edit it by hand")
    indent = _child_indent(lines, positions, section, head)
    at = _section_end(lines, head, eol)
    lines[at:at] = [f"{indent}{key}: {text}{eol}" for key, text in items]


def _is_flow(line: str) -> bool:
    m = _LINE.match(line)
    return m is not None and m["value"].lstrip().startswith("{")


def _clear_empty_value(lines: list[str], head: int, path: Path) -> None:
    """`ppo: null` or `ppo: {}` becomes `ppo:` so children can follow (`ppo:` stays as it is)."""
    m = _LINE.match(lines[head - 1])
    if m is None:
        raise ConfigError(f"{path}:{head}: cannot add keys under this line; edit it by hand")
    if not m["value"].strip():
        return
    comment = f" {m['comment']}" if m["comment"] else ""
    lines[head - 1] = f"{m['indent']}{m['key']}:{comment}{m['eol'] or ''}"


def _child_indent(lines: list[str], positions: dict[Any, int], section: str, head: int) -> str:
    """The indentation of the section's first key, else the section's plus two spaces."""
    children = [n for k, n in positions.items() if len(k) == 2 and k[0] == section]
    if children:
        first = lines[min(children) - 1]
        return first[: len(first) - len(first.lstrip(" \t"))]
    own = lines[head - 1]
    return own[: len(own) - len(own.lstrip(" \t"))] + "  "


def _section_end(lines: list[str], head: int, eol: str) -> int:
    """Index after the last content line indented deeper than the section's key line (blank
    lines and comments after it belong to whatever follows)."""
    own = len(lines[head - 1]) - len(lines[head - 1].lstrip(" \t"))
    end = head
    for i in range(head, len(lines)):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if len(lines[i]) - len(lines[i].lstrip(" \t")) <= own:
            break
        end = i + 1
    if end == len(lines) and not lines[-1].endswith("\n"):
        lines[-1] += eol
    return end


def _replace_checked(path: Path, text: str, changes: dict[str, Any]) -> None:
    """Load the edited text with the real loader, compare the values, then swap files."""
    from swallowctl.core.config import load_config

    with _temp_beside(path, text) as tmp:
        try:
            cfg = load_config(tmp).config
            for dotted_key, value in changes.items():
                section, key = dotted_key.split(".", 1)
                got = getattr(getattr(cfg, section), key)
                if got != value or type(got) is not type(value):
                    raise ValueError(f"{dotted_key} reads back as {got!r}, not {value!r}")
        except (ConfigError, ValueError, AttributeError) as e:
            raise RuntimeFailure(
                f"{path}: the edited config would not load as intended ({e}); left unchanged",
                hint="apply the --set options shown instead",
            ) from None
        shutil.copymode(path, tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def _temp_beside(path: Path, text: str) -> Iterator[Path]:
    """A temporary file in `path`'s folder holding `text` (removed afterwards unless it was
    moved into place)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()

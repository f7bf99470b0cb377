"""YAML that remembers where each value came from, so config errors can say `FILE:LINE`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from swallowctl.core.errors import ConfigError

KeyPath = tuple[str | int, ...]


def dotted(path: KeyPath) -> str:
    """`("rewards", 0, "weight")` -> `rewards.0.weight`."""
    return ".".join(str(p) for p in path)


class _DuplicateKey(Exception):
    def __init__(self, path: KeyPath, line: int, first: int) -> None:
        self.path, self.line, self.first = path, line, first


def _positions(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int]) -> None:
    # Lines are 1-based for people; the value's line is where an error is best shown.
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            # PyYAML keeps the last of two equal keys without a word: a silently lost setting.
            if key in seen:
                raise _DuplicateKey((*path, key), line, seen[key])
            seen[key] = line
            _positions(value_node, (*path, key), out)
            # An unknown or misplaced key is best shown on the key's own line.
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, (*path, i), out)


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `path` with the safe loader; return the data and a map from key path to line.

    Raises ConfigError (one line, with file and line) for unreadable files and YAML syntax errors.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file",
            hint=f"create one with 'swallowctl config init {path}'",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}); a config file is YAML",
            hint="save the file as UTF-8",
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None

    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise ConfigError(
            f"{path}:{line}: not a text file (character #x{e.character:04x}); a config file is YAML"
        ) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    finally:
        loader.dispose()

    positions: dict[KeyPath, int] = {}
    if node is not None:
        try:
            _positions(node, (), positions)
        except _DuplicateKey as e:
            raise ConfigError(
                f"{path}:{e.line}: {dotted(e.path)}: duplicate key (first at line {e.first})",
                hint="keep one of the two",
            ) from None
    return data, positions
